"""Run config: every shipped YAML and DeepSpeed JSON loads; errors name the key; fingerprints."""

from __future__ import annotations

from pathlib import Path

import pytest

from umbrella_ds.config import DS_STAGES, FINGERPRINT_SCHEME, ConfigError, RunConfig, load_config
from umbrella_ds.train.checkpoint import CheckpointError, Found, check_fingerprints
from umbrella_ds.train.ds_setup import lr_lambda, resolve_ds_config
from umbrella_ds.train.env import discover

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_yaml_loads_and_resolves(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    world = cfg.train.global_batch // cfg.train.micro_batch  # one micro-batch per rank
    ds = resolve_ds_config(cfg.train, world)
    assert ds["train_batch_size"] == cfg.train.global_batch
    assert ds["gradient_accumulation_steps"] == 1


@pytest.mark.parametrize("stage", DS_STAGES)
def test_ds_configs_resolve_every_auto(stage):
    cfg = load_config(
        None, [f"train.deepspeed={stage}", "train.global_batch=32", "train.micro_batch=4"]
    )
    ds = resolve_ds_config(cfg.train, world_size=2)
    assert "auto" not in repr(ds)
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["optimizer"]["params"]["lr"] == cfg.train.lr
    assert ds["gradient_clipping"] == cfg.train.clip
    assert ds["bf16"]["enabled"] is True
    assert ds["zero_optimization"]["stage"] == (
        1 if stage == "zero1" else 2 if stage == "zero2" else 3
    )


def test_demo_yaml_is_what_make_demo_needs():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.model.preset == "tiny" and list(cfg.model.modalities) == ["T1"]
    assert cfg.train.deepspeed == "zero2"
    assert cfg.train.accumulation(2) >= 1
    assert cfg.output_dir == str((Path.cwd() / "runs" / "demo").resolve())  # relative to cwd


def test_overrides_types_and_several_pairs():
    cfg = load_config(
        None,
        [
            "train.max_steps=7",
            "train.lr=3e-4",  # PyYAML reads this as a string; still a number here
            "model.modalities.T1.patch=[4, 4, 4]",
            "data.train=a.jsonl",
            "checkpoint.keep_best=null",
            "eval.max_samples=5",
        ],
    )
    assert cfg.train.max_steps == 7 and cfg.train.lr == 3e-4
    assert cfg.model.modalities["T1"].size == [32, 32, 32]  # kept from the default
    assert cfg.model.modalities["T1"].patch == [4, 4, 4]
    assert cfg.data.train == [str(Path("a.jsonl").resolve())]
    assert cfg.checkpoint.keep_best is None and cfg.eval.max_samples == 5


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.max_step=3", "train.max_step"),
        ("trian.max_steps=3", "trian"),
        ("train.max_steps=abc", "train.max_steps"),
        ("train.max_steps=1.5", "train.max_steps"),
        ("train.bf16=yes please", "train.bf16"),
        ("train.compile=all", "train.compile"),
        ("train.deepspeed=zero4", "train.deepspeed"),
        ("train.lr=-1", "train.lr"),
        ("train.global_batch=10", "train.global_batch"),  # not a multiple of micro_batch 8
        ("model.modalities.T1.patch=[64, 64, 64]", "model.modalities.T1"),
        ("model.modalities.DWI.size=[8, 8, 8]", "model.modalities.DWI"),
        ("data.overflow=cut", "data.overflow"),
        ("checkpoint.keep_last=0", "checkpoint.keep_last"),
        ("checkpoint.keep_best=t1/sex/accuracy", "checkpoint.keep_best"),
        ("checkpoint.keep_best=t1_sex/", "checkpoint.keep_best"),
        ("checkpoint.keep_best=accuracy", "checkpoint.keep_best"),  # no data.eval to rank by
        ("output_dir", "output_dir"),
    ],
)
def test_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_yaml_unknown_key_names_file_key(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("train:\n  max_steps: 3\n  lr_schedule: cosine\n")
    with pytest.raises(ConfigError, match=r"train\.lr_schedule"):
        load_config(p)


def test_accumulation_must_divide():
    cfg = load_config(None, ["train.global_batch=16", "train.micro_batch=8"])
    assert cfg.train.accumulation(1) == 2 and cfg.train.accumulation(2) == 1
    with pytest.raises(ConfigError, match="global_batch"):
        cfg.train.accumulation(3)


def test_fingerprint_ignores_extension_and_cadence_only():
    base = load_config(None, [])
    same = load_config(
        None,
        ["train.max_steps=99999", "output_dir=/elsewhere", "log.every_steps=5",
         "eval.every_steps=7", "checkpoint.every_steps=3", "checkpoint.keep_last=9"],
    )  # fmt: skip
    assert same.fingerprint() == base.fingerprint()
    for change in ("train.lr=1e-3", "train.seed=1", "train.global_batch=32", "model.preset=small"):
        assert load_config(None, [change]).fingerprint() != base.fingerprint(), change
    assert load_config(None, ["model.preset=small"]).model_fingerprint() != base.model_fingerprint()


def test_warmup_cosine_schedule():
    cfg = load_config(
        None, ["train.lr=1.0", "train.min_lr=0.1", "train.warmup_steps=4", "train.max_steps=14"]
    )
    f = lr_lambda(cfg.train)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("environ", "expect"),
    [
        ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "1234"},
         (3, 4, 1, "h0", 1234, "deepspeed/torchrun")),
        ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "777",
          "MASTER_ADDR": "n1", "SLURMD_NODENAME": "node2"},
         (5, 8, 1, "n1", 20777, "srun")),
        ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
          "MASTER_ADDR": "m", "MASTER_PORT": "2000"},
         (1, 2, 1, "m", 2000, "mpirun")),
    ],
)  # fmt: skip
def test_launcher_discovery(environ, expect):
    d = discover(environ)
    assert (
        d.rank,
        d.world_size,
        d.node_local_rank,
        d.master_addr,
        d.master_port,
        d.launcher,
    ) == expect
    if "SLURMD_NODENAME" in environ:
        assert d.slurm_node == "node2"


def test_single_process_fallback():
    d = discover({})
    assert (d.rank, d.world_size, d.launcher) == (0, 1, "single")


GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.parametrize("meta", sorted(GOLDEN.glob("meta_*.json")), ids=lambda p: p.stem)
def test_golden_checkpoint_fingerprints_unchanged(meta):
    """A checkpoint written by an earlier release (meta.json of a `tiny` run, kept as written) still
    resumes: its saved config, read by today's code with every newer key at its default, gives the
    config and model fingerprints it was saved with. A new run-config key that changes them breaks
    every requeued job after an upgrade; list it in config.FINGERPRINTED_UNLESS_DEFAULT."""
    import json

    from umbrella_ds.config import config_from_dict

    record = json.loads(meta.read_text())
    cfg = config_from_dict(record["config"])
    # hashed in the scheme the checkpoint records (absent: 1, before train.micro_batch and
    # train.compile left the fingerprint), as checkpoint.check_fingerprints compares it
    scheme = record.get("fingerprint_scheme", 1)
    assert cfg.fingerprint(scheme) == record["fingerprints"]["config"]
    assert cfg.model_fingerprint() == record["fingerprints"]["model"]
    check_fingerprints(Found(meta, record), dict(record["fingerprints"]), False, 0, cfg)


CONFIG_MISMATCH = r"fingerprint mismatch \(config: checkpoint "  # only the config differs


def _golden(scheme: int) -> dict:
    import json

    for meta in sorted(GOLDEN.glob("meta_*.json")):
        record = json.loads(meta.read_text())
        if record.get("fingerprint_scheme", 1) == scheme:
            return record
    raise AssertionError(f"no golden meta.json of fingerprint scheme {scheme} in {GOLDEN}")


def _resume_check(record: dict, *changes: str) -> None:
    """What the engine does before building anything: today's fingerprints of the checkpoint's
    config with ``changes`` applied, checked against its record (raises on a mismatch)."""
    from umbrella_ds.config import config_from_dict

    cfg = config_from_dict(record["config"])
    for change in changes:
        key, value = change.split("=")
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, type(getattr(getattr(cfg, section), name))(value))
    current = {
        "config": cfg.fingerprint(),
        "model": cfg.model_fingerprint(),
        "data": record["fingerprints"]["data"],
    }
    check_fingerprints(Found(GOLDEN, record), current, False, 0, cfg)


def test_micro_batch_and_compile_left_the_fingerprint_in_scheme_2():
    base = load_config(None, [])
    for change in ("train.micro_batch=2", "train.compile=blocks"):
        changed = load_config(None, [change])
        assert changed.fingerprint() == base.fingerprint(), change
        assert changed.fingerprint(1) != base.fingerprint(1), change  # scheme 1 hashed them


def test_resume_with_another_micro_batch_is_accepted_another_lr_refused():
    record = _golden(FINGERPRINT_SCHEME)
    assert record["config"]["train"]["micro_batch"] == 2  # global batch 4
    _resume_check(record)
    _resume_check(record, "train.micro_batch=1", "train.compile=blocks")  # same global batch
    with pytest.raises(CheckpointError, match=CONFIG_MISMATCH):
        _resume_check(record, "train.lr=0.001")


def test_scheme_1_checkpoint_is_compared_the_old_way():
    """A checkpoint written before scheme 2 recorded micro_batch in its hash: it resumes as it
    is, and (its fingerprint cannot tell what changed) refuses another micro-batch as before."""
    record = _golden(1)
    _resume_check(record)
    with pytest.raises(CheckpointError, match=CONFIG_MISMATCH):
        _resume_check(record, "train.micro_batch=1")
    with pytest.raises(CheckpointError, match=CONFIG_MISMATCH):
        _resume_check(record, "train.lr=0.001")


def test_unknown_fingerprint_scheme_is_refused():
    record = {**_golden(FINGERPRINT_SCHEME), "fingerprint_scheme": FINGERPRINT_SCHEME + 1}
    with pytest.raises(CheckpointError, match="fingerprint_scheme"):
        _resume_check(record)
