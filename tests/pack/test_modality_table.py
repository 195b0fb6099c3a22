"""The modality table (umbrella_ds.modality): lookups, registration, what follows from it, and the
proof that a third modality needs no change to the package: a T2 registered by a plugin module
in this test alone is packed, trained on for 2 steps and evaluated, through the real CLIs.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers.net import free_port

from umbrella_ds import modality
from umbrella_ds.config import ConfigError, load_config
from umbrella_ds.model.patch_embed import ModalitySpec

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PLUGIN = '''"""Test plugin: a T2-weighted volume, registered on import."""
from umbrella_ds.modality import Modality, register

T2 = register(Modality(name="T2", ndim=3, aliases=("T2w",), bids=("anat", "T2w")))
'''


def _t2() -> modality.Modality:
    return modality.Modality(name="T2", ndim=3, aliases=("T2w",), bids=("anat", "T2w"))


@pytest.fixture
def t2() -> Iterator[modality.Modality]:
    """T2 registered in this process for one test, then removed again."""
    m = modality.register(_t2())
    try:
        yield m
    finally:
        modality.unregister("T2")


# -- the table ---------------------------------------------------------------------------------
def test_builtins_in_fixed_order() -> None:
    assert modality.names() == ("T1", "rsfMRI")
    assert [m.name for m in modality.all()] == ["T1", "rsfMRI"]
    assert modality.spellings() == ("sMRI", "T1", "fMRI", "rsfMRI")


@pytest.mark.parametrize(
    ("spelling", "name"),
    [("T1", "T1"), ("t1", "T1"), ("sMRI", "T1"), ("SMRI", "T1"), (" fMRI ", "rsfMRI"),
     ("rsfMRI", "rsfMRI"), ("rsfmri", "rsfMRI")],
)  # fmt: skip
def test_aliases(spelling: str, name: str) -> None:
    assert modality.get(spelling).name == name


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(KeyError, match=r"unknown modality 'DWI'; known: sMRI, T1, fMRI, rsfMRI"):
        modality.get("DWI")
    assert not modality.is_known("t1")  # exact names only where a name is stored


def test_what_follows_from_ndim() -> None:
    t1, rs = modality.get("T1"), modality.get("rsfMRI")
    assert (t1.ndim, t1.is_series, rs.ndim, rs.is_series) == (3, False, 4, True)
    # the patch embedding asks the same rule of a grid (no modality name there)
    assert not ModalitySpec(size=(8, 8, 8), patch=(4, 4, 4)).is_series
    assert ModalitySpec(size=(8, 8, 8, 4), patch=(4, 4, 4, 2)).is_series
    for gone in ("reader", "storage", "patch_branch", "dataset_read"):  # one spelling: is_series
        assert not hasattr(t1, gone), gone
    assert (t1.norms, t1.default_norm) == (("zscore", "none"), "zscore")
    assert rs.norms == ("znorm_minback", "znorm_zeroback", "minmax", "none")
    assert rs.default_norm == "znorm_minback"
    assert (t1.manifest_column, rs.manifest_column) == ("T1", "rsfMRI")
    assert (t1.size_flag, t1.norm_flag, rs.size_flag, rs.norm_flag) == (
        "--t1-size", "--t1-norm", "--rsfmri-size", "--rsfmri-norm",
    )  # fmt: skip


def test_registration_order_and_clashes(t2: modality.Modality) -> None:
    assert modality.names() == ("T1", "rsfMRI", "T2")
    assert modality.get("t2w") is t2
    assert modality.register(_t2()) is not None  # the same modality again: a no-op
    with pytest.raises(ValueError, match="clashes"):
        modality.register(modality.Modality(name="T2star", ndim=3, aliases=("sMRI",)))
    with pytest.raises(ValueError, match="ndim"):
        modality.Modality(name="DWI", ndim=5)
    with pytest.raises(ValueError, match="no implementation"):
        modality.Modality(name="DWI", ndim=3, norms=("minmax",))
    assert modality.ordered(["T2", "rsfMRI", "T1"]) == ["T1", "rsfMRI", "T2"]


def test_window_length_and_grid_rules() -> None:
    assert modality.window_length({"T1": {"size": [8, 8, 8]}}) == 1
    assert (
        modality.window_length({"T1": {"size": [8, 8, 8]}, "rsfMRI": {"size": [8, 8, 8, 6]}}) == 6
    )
    assert modality.grid_problems([8, 8, 8], [4, 4, 4]) == set()
    assert modality.grid_problems([8, 8], [4, 4, 4]) == {"length", "ndim"}
    assert modality.grid_problems([8, 8, 8], [0, 9, 4]) == {"nonpositive", "too_big"}


def test_pack_flags_come_from_the_table(t2: modality.Modality) -> None:
    from data_prep.cli import make_parser

    a = make_parser().parse_args(["build", "--manifest", "m.csv", "--out", "o",
                                  "--t1-size", "8", "8", "8", "--rsfmri-norm", "minmax",
                                  "--t2-size", "16", "16", "16", "--t2-norm", "none"])  # fmt: skip
    assert (a.t1_size, a.rsfmri_size, a.t2_size) == ([8, 8, 8], (96, 96, 96), [16, 16, 16])
    assert (a.t1_norm, a.rsfmri_norm, a.t2_norm) == ("zscore", "minmax", "none")
    with pytest.raises(SystemExit):
        make_parser().parse_args(["build", "--manifest", "m", "--out", "o", "--t2-norm", "minmax"])


def test_config_asks_the_table(t2: modality.Modality) -> None:
    cfg = load_config(None, ["model.modalities={T2: {size: [16, 16, 16], patch: [8, 8, 8]}}"])
    assert list(cfg.model.modalities) == ["T2"]
    with pytest.raises(ConfigError, match=r"model\.modalities\.T2\.size: expected 3 numbers"):
        load_config(None, ["model.modalities={T2: {size: [16, 16, 16, 4], patch: [8, 8, 8, 4]}}"])
    modality.unregister("T2")
    try:
        with pytest.raises(ConfigError, match=r"unknown modality \(T1, rsfMRI\)"):
            load_config(None, ["model.modalities={T2: {size: [16, 16, 16], patch: [8, 8, 8]}}"])
    finally:
        modality.register(t2)


def test_plugins_from_a_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "umbrella_t2_unit_plugin.py").write_text(
        "from umbrella_ds.modality import Modality\n"
        "MODALITIES = [Modality(name='T2', ndim=3, aliases=('T2w',), bids=('anat', 'T2w'))]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        added = modality.load_plugins("umbrella_t2_unit_plugin:MODALITIES")
        assert [m.name for m in added] == ["T2"] and modality.names()[-1] == "T2"
    finally:
        modality.unregister("T2")
    with pytest.raises(ImportError, match=modality.PLUGINS_ENV):
        modality.load_plugins("no_such_umbrella_plugin")


# -- the proof: T2 through pack, train and evaluation, the package unchanged ---------------------
def _as_t2(obj: object, t2_paths: dict[str, str]) -> object:
    """A synthetic T1 task rewritten to ask about the subject's T2 image."""
    if isinstance(obj, dict):
        out = {k: _as_t2(v, t2_paths) for k, v in obj.items()}
        if out.get("modality") == "sMRI":
            out["modality"] = "T2"
        for key in ("path", "image_path"):
            if key in out:
                out[key] = t2_paths[Path(out[key]).name.split(".")[0]]
        if "modalities" in out:
            out["modalities"] = ["T2"]
        return out
    if isinstance(obj, list):
        return [_as_t2(v, t2_paths) for v in obj]
    return obj


@pytest.mark.multiproc
@pytest.mark.timeout(420)
def test_t2_packs_trains_and_evaluates_without_changing_the_package(
    tmp_path: Path, t2: modality.Modality
) -> None:
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "umbrella_t2_plugin.py").write_text(PLUGIN)
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
        UMBRELLA_MODALITY_PLUGINS="umbrella_t2_plugin",
        PYTHONPATH=os.pathsep.join([str(tmp_path / "plugins"), env.get("PYTHONPATH", "")]),
    )  # fmt: skip

    def run(*cmd: object, timeout: int = 120) -> subprocess.CompletedProcess:
        r = subprocess.run([str(c) for c in cmd], env=env, cwd=REPO, capture_output=True,
                           text=True, timeout=timeout)  # fmt: skip
        assert r.returncode == 0, f"{cmd}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r

    raw = tmp_path / "raw"
    run(BIN / "umbrella-pack", "synth", "--out", raw, "--subjects", "10", "--seed", "0",
        "--t1-shape", "20", "20", "20", "--frames", "8", "--rsfmri-shape", "8", "8", "8")  # fmt: skip

    # T2 images: the contrast of each synthetic T1 inverted inside the head (background stays 0).
    (raw / "t2").mkdir()
    with open(raw / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    t2_paths = {}
    for row in rows:
        img = nib.load(raw / row["T1"])
        data = img.get_fdata(dtype=np.float32)
        head = data > 0
        t2_data = np.where(head, data.max() - data + 1.0, 0.0).astype(np.float32)
        path = raw / "t2" / f"{row['subjectkey']}.nii.gz"
        nib.save(nib.Nifti1Image(t2_data, img.affine), path)
        t2_paths[row["subjectkey"]] = str(path)
    with open(raw / "manifest_t2.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["subjectkey", "T1", "T2", "sex"])
        w.writerows([r["subjectkey"], r["T1"], t2_paths[r["subjectkey"]], r["sex"]] for r in rows)
    inst = {}
    for split in ("train", "eval"):
        lines = (raw / "instructions" / f"t1_sex_{split}.jsonl").read_text().splitlines()
        inst[split] = tmp_path / f"t2_sex_{split}.jsonl"
        inst[split].write_text(
            "".join(json.dumps(_as_t2(json.loads(x), t2_paths)) + "\n" for x in lines)
        )

    shards_dir = tmp_path / "shards"
    run(BIN / "umbrella-pack", "build", "--manifest", raw / "manifest_t2.csv", "--out", shards_dir,
        "--t1-size", "16", "16", "16", "--t2-size", "16", "16", "16", "--t2-norm", "zscore",
        "--subjects-per-shard", "4", "--no-progress")  # fmt: skip
    run(BIN / "umbrella-pack", "verify", shards_dir)
    from umbrella_ds.scan.preprocess import preprocess
    from umbrella_ds.shards import open_dataset

    ds = open_dataset(shards_dir)
    assert ds.modalities == ["T1", "T2"] and ds.shape("T2") == (16, 16, 16)
    sid = rows[0]["subjectkey"]
    np.testing.assert_array_equal(
        ds.read(sid, "T2"), preprocess("T2", t2_paths[sid], ds.preprocessing)
    )
    assert not np.array_equal(ds.read(sid, "T2"), ds.read(sid, "T1"))

    out = tmp_path / "run"
    sets = {
        "output_dir": out, "data.shards": shards_dir,
        "data.train": f"[{inst['train']}]", "data.eval": f"[{inst['eval']}]",
        "model.modalities": "{T2: {size: [16, 16, 16], patch: [8, 8, 8]}}",
        "train.max_steps": 2, "train.global_batch": 4, "train.micro_batch": 4,
        "train.warmup_steps": 0, "train.bf16": "false", "checkpoint.every_steps": 0,
        "log.progress": "false", "log.every_steps": 1, "log.tensorboard": "false",
        "eval.at_end": "true", "eval.max_new_tokens": 2,
    }  # fmt: skip
    run(BIN / "deepspeed", "--num_gpus", "1", "--master_port", free_port(),
        REPO / "umbrella_ds" / "train" / "__main__.py", "--config", REPO / "configs" / "demo.yaml",
        "--resume", "none", "--set", *(f"{k}={v}" for k, v in sets.items()), timeout=360)  # fmt: skip

    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and all(np.isfinite(r["loss"]) for r in train)
    evals = [r for r in records if r["split"] == "eval"]
    assert evals, records
    start = json.dumps([r for r in records if r["split"] == "start"])
    assert "T2 16x16x16 / 8x8x8: 8 image tokens" in start, start
    predictions = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    n_eval = len(inst["eval"].read_text().splitlines())
    assert len(predictions) == n_eval
