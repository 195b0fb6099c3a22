"""DeepSpeed JSONs as users have them (HF-Trainer style): the forms none, scheduler, "auto"
(hidden-size keys too), offload and conflict, resolved against the run config; and one real
2-rank run with such a JSON whose resolved config (fp32 gradient reduction included) is recorded.

The fixtures in tests/train/ds_json/ imitate transformers' documented ds_config_zero2/zero3 files.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
from helpers.training import base_sets, check, metrics, run_train

from umbrella_ds.config import ConfigError, load_config
from umbrella_ds.train import ds_setup
from umbrella_ds.train.ds_setup import lr_lambda, resolve_ds_config

FIXTURES = Path(__file__).resolve().parent / "ds_json"
HIDDEN = 64  # the tiny preset's language model


def train_cfg(ds: str | Path | dict, tmp_path: Path | None = None, **sets):
    """A TrainConfig on ``ds``: a fixture name, a path, or a dict written to a file."""
    if isinstance(ds, dict):
        assert tmp_path is not None
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(ds))
        ds = path
    elif isinstance(ds, str) and not ds.startswith("zero"):
        ds = FIXTURES / ds
    base = {"deepspeed": str(ds), "global_batch": 16, "micro_batch": 8, "lr": 1e-3,
            "weight_decay": 0.01, "warmup_steps": 3, "max_steps": 20, "min_lr": 1e-4}  # fmt: skip
    base.update(sets)
    return load_config(None, [f"train.{k}={v}" for k, v in base.items()]).train


def resolve(train, *, on_cpu: bool = True, hidden_size: int | None = HIDDEN, world: int = 2):
    return resolve_ds_config(train, world, hidden_size=hidden_size, on_cpu=on_cpu)


# ------------------------------------------------------------------ none


def test_no_optimizer_section_takes_the_run_configs_adamw():
    ds = resolve(train_cfg("hf_zero2.json"))
    assert ds["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01},
    }
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 1
    assert ds["train_batch_size"] == 16 and ds["gradient_clipping"] == 1.0
    assert ds["bf16"] == {"enabled": True}
    assert ds["fp16"]["enabled"] is False  # "auto" on a bf16 run
    assert ds["communication_data_type"] == "fp32"
    assert "scheduler" not in ds


def test_eps_comes_from_train_adam_eps_or_the_json():
    assert resolve(train_cfg("hf_zero2.json", adam_eps=1e-6))["optimizer"]["params"]["eps"] == 1e-6
    # the shipped JSONs say 1e-08; a user's explicit eps is kept while train.adam_eps is unset
    assert resolve(train_cfg("zero2"))["optimizer"]["params"]["eps"] == 1e-8
    with pytest.raises(ConfigError, match=r"optimizer.params.eps=1e-08 .*train.adam_eps=1e-06"):
        resolve(train_cfg("zero2", adam_eps=1e-6))


@pytest.mark.parametrize(
    "optimizer, message",
    [
        ({"type": "Lamb", "params": {}}, r'optimizer.type="Lamb": only AdamW'),
        ({"type": "AdamW", "params": {"amsgrad": True}}, r"optimizer.params.amsgrad is not"),
        ({"type": "adamw", "params": {"lr": 0.1}}, r"optimizer.params.lr=0.1 .*train.lr=0.001"),
    ],
)
def test_optimizer_sections_that_differ_are_refused(tmp_path, optimizer, message):
    ds = json.loads((FIXTURES / "hf_zero2.json").read_text()) | {"optimizer": optimizer}
    with pytest.raises(ConfigError, match=message):
        resolve(train_cfg(ds, tmp_path))


# ------------------------------------------------------------------ scheduler


def test_warmup_cosine_scheduler_maps_onto_the_run_schedule():
    train = train_cfg("hf_zero2_scheduler_offload.json")
    ds = resolve(train)
    assert ds["scheduler"] == {
        "type": "WarmupCosineLR",
        "params": {"total_num_steps": 20, "warmup_num_steps": 3, "warmup_type": "linear",
                   "cos_min_ratio": pytest.approx(0.1), "warmup_min_ratio": 0.0},
    }  # fmt: skip
    # the schedule the run steps with is the run config's, whatever the block said
    f = lr_lambda(train)
    assert [round(f(s), 6) for s in (0, 2, 3, 20)] == [round(1 / 3, 6), 1.0, 1.0, 0.1]


def test_warmup_lr_maps_only_onto_a_flat_schedule(tmp_path):
    ds = resolve(train_cfg("hf_zero3_offload.json", min_lr=1e-3))
    assert ds["scheduler"]["params"] == {
        "warmup_min_lr": 0.0, "warmup_max_lr": 1e-3, "warmup_num_steps": 3,
        "warmup_type": "linear",
    }  # fmt: skip
    with pytest.raises(ConfigError, match=r"WarmupLR holds the lr .*train.min_lr=0.0001"):
        resolve(train_cfg("hf_zero3_offload.json"))


@pytest.mark.parametrize(
    "scheduler, message",
    [
        ({"type": "WarmupDecayLR", "params": {}}, r"WarmupDecayLR decays linearly"),
        ({"type": "OneCycle", "params": {}}, r'scheduler.type="OneCycle": only WarmupLR'),
        (
            {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 100}},
            r"scheduler.params.warmup_num_steps=100 conflicts .*train.warmup_steps=3",
        ),
        (
            {"type": "WarmupCosineLR", "params": {"warmup_type": "log"}},
            r'warmup_type="log" conflicts .*\(the run\'s warmup="linear"\)',
        ),
        (
            {"type": "WarmupCosineLR", "params": {"total_num_steps": 50}},
            r"total_num_steps=50 conflicts .*train.max_steps=20",
        ),
        ({"type": "WarmupCosineLR", "params": {"gamma": 1}}, r"scheduler.params.gamma is not"),
    ],
)
def test_scheduler_blocks_that_differ_are_refused(tmp_path, scheduler, message):
    ds = json.loads((FIXTURES / "hf_zero2.json").read_text()) | {"scheduler": scheduler}
    with pytest.raises(ConfigError, match=message):
        resolve(train_cfg(ds, tmp_path))


# ------------------------------------------------------------------ auto


def test_hidden_size_autos_are_filled_as_hf_fills_them():
    ds = resolve(train_cfg("hf_zero3_offload.json", min_lr=1e-3), on_cpu=False)
    zero = ds["zero_optimization"]
    assert zero["reduce_bucket_size"] == HIDDEN * HIDDEN
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * HIDDEN * HIDDEN)
    assert zero["stage3_param_persistence_threshold"] == 10 * HIDDEN
    assert "auto" not in json.dumps(ds)
    ds2 = resolve(train_cfg("hf_zero2.json"))
    assert ds2["zero_optimization"]["reduce_bucket_size"] == HIDDEN * HIDDEN


def test_hidden_size_auto_without_a_hidden_size_names_the_key():
    with pytest.raises(ConfigError, match=r'zero_optimization.reduce_bucket_size="auto" needs'):
        resolve(train_cfg("hf_zero2.json"), hidden_size=None)


def test_stage3_autos_on_stage_2_and_unknown_autos_name_the_key(tmp_path):
    ds = json.loads((FIXTURES / "hf_zero2.json").read_text())
    ds["zero_optimization"]["stage3_prefetch_bucket_size"] = "auto"  # HF leaves it too
    with pytest.raises(ConfigError, match=r'zero_optimization.stage3_prefetch_bucket_size="auto"'):
        resolve(train_cfg(ds, tmp_path))
    ds = json.loads((FIXTURES / "hf_zero2.json").read_text())
    ds["zero_optimization"]["allgather_bucket_size"] = "auto"
    with pytest.raises(ConfigError, match=r'zero_optimization.allgather_bucket_size="auto" has'):
        resolve(train_cfg(ds, tmp_path))


def test_model_hidden_size_is_hfs_rule_on_the_model_config(tmp_path):
    from umbrella_ds.model.presets import get_preset

    assert ds_setup.model_hidden_size("tiny") == HIDDEN
    assert ds_setup.model_hidden_size("llava-interleave-qwen-0.5b") == 1024  # text, not vision
    get_preset("small").make_config().save_pretrained(tmp_path)
    assert ds_setup.model_hidden_size(str(tmp_path)) == 256
    assert ds_setup.model_hidden_size(str(tmp_path / "absent")) is None


@pytest.mark.parametrize("stage", ["zero1", "zero2", "zero3", "zero3_offload"])
def test_shipped_jsons_reduce_in_fp32_and_force_ds_cpu_adam(stage):
    ds = resolve(train_cfg(stage), on_cpu=False)
    assert ds["communication_data_type"] == "fp32"
    assert ds.get("zero_force_ds_cpu_optimizer", True) is True
    assert ds_setup.offloads_optimizer(ds) is (stage == "zero3_offload")


def test_communication_data_type_auto_is_fp32_and_an_explicit_one_is_kept(tmp_path):
    ds = json.loads((FIXTURES / "hf_zero2.json").read_text())
    assert (
        resolve(train_cfg(ds | {"communication_data_type": "auto"}, tmp_path))[
            "communication_data_type"
        ]
        == "fp32"
    )
    assert (
        resolve(train_cfg(ds | {"communication_data_type": "bf16"}, tmp_path))[
            "communication_data_type"
        ]
        == "bf16"
    )


# ------------------------------------------------------------------ offload


def test_offload_is_dropped_with_a_warning_on_the_cpu(caplog):
    with caplog.at_level(logging.WARNING, logger="umbrella_ds.train"):
        ds = resolve(train_cfg("hf_zero3_offload.json", min_lr=1e-3), on_cpu=True)
    zero = ds["zero_optimization"]
    assert "offload_optimizer" not in zero and "offload_param" not in zero
    warned = [r.getMessage() for r in caplog.records]
    assert any("offload_optimizer dropped" in m for m in warned)
    assert any("offload_param dropped" in m for m in warned)
    assert not ds_setup.offloads_optimizer(ds)


def test_offload_is_kept_on_a_gpu_and_param_offload_needs_stage_3(tmp_path):
    ds = resolve(train_cfg("hf_zero3_offload.json", min_lr=1e-3), on_cpu=False)
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds_setup.offloads_optimizer(ds)
    stage2 = json.loads((FIXTURES / "hf_zero2.json").read_text())
    stage2["zero_optimization"]["offload_param"] = {"device": "cpu"}
    with pytest.raises(ConfigError, match=r"offload_param needs ZeRO stage 3 \(stage is 2\)"):
        resolve(train_cfg(stage2, tmp_path), on_cpu=False)


# ------------------------------------------------------------------ conflict


@pytest.mark.parametrize(
    "change, sets, message",
    [
        ({"fp16": {"enabled": True}}, {}, r"fp16.enabled=true conflicts .*train.bf16=true"),
        ({"bf16": {"enabled": False}}, {}, r"bf16.enabled=false conflicts .*train.bf16=true"),
        ({"train_micro_batch_size_per_gpu": 4}, {},
         r"train_micro_batch_size_per_gpu=4 conflicts .*train.micro_batch=8"),
        ({"train_batch_size": 32}, {}, r"train_batch_size=32 conflicts .*train.global_batch=16"),
        ({"gradient_clipping": 0.5}, {}, r"gradient_clipping=0.5 conflicts .*train.clip=1.0"),
        ({"amp": {"enabled": True}}, {}, r"amp.enabled=true conflicts"),
    ],
)  # fmt: skip
def test_conflicts_are_refused_naming_both_values(tmp_path, change, sets, message):
    ds = json.loads((FIXTURES / "hf_zero2.json").read_text()) | change
    with pytest.raises(ConfigError, match=message) as e:
        resolve(train_cfg(ds, tmp_path, **sets))
    assert "\n" not in str(e.value) and str(tmp_path / "ds.json") in str(e.value)


def test_fp16_auto_on_an_fp32_run_is_off(tmp_path):
    ds = resolve(train_cfg("hf_zero2.json", bf16="false"))
    assert ds["fp16"]["enabled"] is False and ds["bf16"]["enabled"] is False


# ------------------------------------------------------------------ a real run


@pytest.mark.timeout(600)
def test_real_run_with_an_hf_style_json_records_what_it_used(train_data, tmp_path):
    """2 ranks, bf16, a JSON with no optimizer section, "auto" everywhere, a WarmupCosineLR block
    and an optimizer offload block (dropped: CPU run). The start record and provenance.json hold
    the resolved config: fp32 gradient reduction, the run config's AdamW, the mapped scheduler."""
    out = tmp_path / "run"
    steps, lr, warmup, min_lr = 4, 2e-3, 2, 2e-4
    sets = base_sets(
        train_data, out,
        **{"train.deepspeed": FIXTURES / "hf_zero2_scheduler_offload.json",
           "train.max_steps": steps, "train.lr": lr, "train.warmup_steps": warmup,
           "train.min_lr": min_lr, "train.weight_decay": 0.01, "checkpoint.every_steps": 100},
    )  # fmt: skip
    proc = run_train(2, sets, timeout=500)
    check(proc)
    assert "offload_optimizer dropped" in proc.stdout + proc.stderr
    start = metrics(out, "start")[0]
    ds = start["deepspeed"]
    assert ds == json.loads((out / "provenance.json").read_text())["extra"]["deepspeed"]
    assert ds["communication_data_type"] == "fp32"
    assert ds["bf16"] == {"enabled": True} and ds["fp16"]["enabled"] is False
    assert ds["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01},
    }
    assert ds["scheduler"]["params"]["total_num_steps"] == steps
    assert ds["scheduler"]["params"]["warmup_num_steps"] == warmup
    assert math.isclose(ds["scheduler"]["params"]["cos_min_ratio"], min_lr / lr)
    assert "offload_optimizer" not in ds["zero_optimization"]
    assert ds["zero_optimization"]["reduce_bucket_size"] == HIDDEN * HIDDEN
    assert "auto" not in json.dumps(ds)
    train = train_cfg("hf_zero2.json", lr=lr, warmup_steps=warmup, min_lr=min_lr, max_steps=steps)
    f = lr_lambda(train)
    logged = [r["lr"] for r in metrics(out, "train")]
    # LambdaLR computes base_lr * factor, the same float operation as here, and JSON round-trips
    # floats exactly: no noise to allow for beyond the last bit.
    assert logged == pytest.approx([lr * f(s) for s in range(steps)], rel=1e-12)


@pytest.mark.timeout(600)
def test_real_zero3_run_with_hf_style_offload_json(train_data, tmp_path):
    """ZeRO-3, bf16, HF's zero3 form: "auto" bucket sizes from the tiny model's hidden size, a
    WarmupLR block on a flat schedule, both offload blocks (dropped: CPU run); the gradients of a
    partitioned run are reduced in fp32 too."""
    out = tmp_path / "run"
    sets = base_sets(
        train_data, out,
        **{"train.deepspeed": FIXTURES / "hf_zero3_offload.json", "train.max_steps": 2,
           "train.lr": 1e-3, "train.min_lr": 1e-3, "checkpoint.every_steps": 100},
    )  # fmt: skip
    proc = run_train(2, sets, timeout=500)
    check(proc)
    assert "offload_param dropped" in proc.stdout + proc.stderr
    ds = metrics(out, "start")[0]["deepspeed"]
    assert ds["communication_data_type"] == "fp32" and ds["bf16"] == {"enabled": True}
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and "offload_param" not in zero and "offload_optimizer" not in zero
    assert zero["stage3_param_persistence_threshold"] == 10 * HIDDEN
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * HIDDEN * HIDDEN)
    assert [r["step"] for r in metrics(out, "train")] == [1, 2]


@pytest.mark.parametrize("key", ["optimizer", "scheduler", "zero_optimization", "fp16", "bf16"])
def test_a_section_that_is_not_an_object_is_refused(tmp_path, key):
    ds = json.loads((FIXTURES / "hf_zero2.json").read_text()) | {key: 3}
    with pytest.raises(ConfigError, match=rf"{key} must be a JSON object, got 3"):
        resolve(train_cfg(ds, tmp_path))


def test_optimizer_offload_builds_deepspeeds_cpu_adam(monkeypatch):
    """On a GPU run with offload_optimizer, the optimizer handed to DeepSpeed is its CPU Adam (in
    AdamW mode, the run config's hyperparameters), so zero_force_ds_cpu_optimizer's check passes.
    A stand-in class records the call: the real one JIT-compiles a C++ op for minutes."""
    import deepspeed.ops.adam
    import torch

    made = {}

    class FakeCPUAdam(torch.optim.AdamW):
        def __init__(self, params, adamw_mode, **kwargs):
            made.update(kwargs, adamw_mode=adamw_mode)
            super().__init__(params, **kwargs)

    monkeypatch.setattr(deepspeed.ops.adam, "DeepSpeedCPUAdam", FakeCPUAdam)
    model = torch.nn.Linear(2, 2)
    train = train_cfg("hf_zero3_offload.json", min_lr=1e-3, adam_eps=1e-6)
    opt, _ = ds_setup.build_optimizer(model, train, resolve(train, on_cpu=False))
    assert isinstance(opt, FakeCPUAdam)
    assert made == {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.01,
                    "adamw_mode": True}  # fmt: skip
    opt, _ = ds_setup.build_optimizer(model, train, resolve(train, on_cpu=True))
    assert type(opt) is torch.optim.AdamW  # offload dropped on the CPU
