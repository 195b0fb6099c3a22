"""A DeepSpeed JSON as users have them (HF-Trainer style) -> the one config the run uses.

HF's Trainer accepts JSONs with no ``optimizer`` section, ``"auto"`` in many places, a
``scheduler`` block and offload blocks; our first users bring such files. The run config owns
what decides the trajectory (batch sizes, AdamW, clipping, bf16, the warmup + cosine schedule);
the JSON owns ZeRO and communication. This module joins them by one rule, written once:

- ``"auto"`` (and, for the optimizer and scheduler parameters, an absent key) takes the run
  config's value; the keys HF derives from the model's hidden size are derived the same way
  (transformers ``integrations/deepspeed.py``, ``trainer_config_finalize``).
- An explicit value must equal the run config's; otherwise a one-line ``ConfigError`` names the
  JSON key, the run-config key and both values.
- ``"auto"`` that nothing here can fill is refused naming the key, before DeepSpeed sees it.
- Offload blocks are kept on a GPU and dropped with a warning on the CPU, where they mean nothing.
- Gradients are reduced in fp32 (``communication_data_type``) unless the JSON says otherwise:
  without it a bf16 engine all-reduces bf16 gradients, and only the patch embedding trains, so
  fp32 costs nothing.

The result is what the run records (start record and provenance.json) and what
``ds_setup.initialize`` hands DeepSpeed, less the optimizer and scheduler it builds itself.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from umbrella_ds.config import ConfigError, TrainConfig

log = logging.getLogger("umbrella_ds.train")

AUTO = "auto"
ADAM_EPS_DEFAULT = 1e-8  # HF TrainingArguments.adam_epsilon, DeepSpeed's and torch's default
OPTIMIZER_PARAMS = ("lr", "betas", "eps", "weight_decay")
SCHEDULERS = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR")
# DeepSpeed's defaults for a scheduler parameter left out (runtime/lr_schedules.py) are not used:
# an absent parameter means "the run config's", as "auto" does, so a JSON that names only a type
# is mapped, and only what the user wrote down can conflict.
SCHEDULER_PARAMS = {
    "WarmupLR": ("warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type"),
    "WarmupDecayLR": (
        "warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type", "total_num_steps",
    ),
    "WarmupCosineLR": (
        "warmup_min_ratio", "warmup_num_steps", "warmup_type", "total_num_steps", "cos_min_ratio",
    ),
}  # fmt: skip
# zero_optimization keys HF fills from the model's hidden size h: h*h for the bucket, and under
# ZeRO-3 only, int(0.9*h*h) for the prefetch bucket and 10*h for the persistence threshold.
HIDDEN_SIZE_KEYS = (
    "reduce_bucket_size",
    "stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold",
)


def resolve(
    ds: dict[str, Any],
    train: TrainConfig,
    world_size: int,
    *,
    where: str | Path,
    hidden_size: int | None,
    on_cpu: bool,
) -> dict[str, Any]:
    """Fill and check ``ds`` (a fresh copy: mutated and returned) against ``train``."""
    r = _Resolver(ds, train, where)
    r.batch_and_precision(world_size)
    r.optimizer()
    r.scheduler()
    r.zero(hidden_size, on_cpu)
    ds.setdefault("communication_data_type", "fp32")
    if ds["communication_data_type"] == AUTO:
        ds["communication_data_type"] = "fp32"
    left = next(_autos(ds), None)
    if left is not None:
        raise ConfigError(
            f'{where}: {left}="auto" has nothing in the run config to fill it from; give a value'
        )
    return ds


def _autos(node: Any, prefix: str = "") -> Iterator[str]:
    """Dotted keys whose value is still "auto"."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _autos(v, f"{prefix}{k}.")
    elif node == AUTO:
        yield prefix[:-1]


class _Resolver:
    def __init__(self, ds: dict[str, Any], train: TrainConfig, where: str | Path) -> None:
        self.ds, self.train, self.where = ds, train, where

    def fail(self, msg: str) -> ConfigError:
        return ConfigError(f"{self.where}: {msg}")

    def section(self, key: str, default: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """``ds[key]`` (set to ``default`` where absent and one is given), refused unless an object."""
        if key not in self.ds and default is not None:
            self.ds[key] = default
        node = self.ds.get(key)
        if node is not None and not isinstance(node, dict):
            raise self.fail(f"{key} must be a JSON object, got {_show(node)}")
        return node

    def match(self, node: dict[str, Any], key: str, dotted: str, value: Any, run_key: str) -> None:
        """Fill "auto" or an absent key with value; an explicit value must equal it."""
        current = node.get(key, AUTO)
        if current == AUTO:
            node[key] = value
        elif not _same(current, value):
            raise self.fail(
                f"{dotted}={_show(current)} conflicts with the run config "
                f'({run_key}={_show(value)}); set it to "auto" or change the run config'
            )

    # ------------------------------------------------------------ batch, clipping, precision

    def batch_and_precision(self, world_size: int) -> None:
        t, ds = self.train, self.ds
        gas = t.accumulation(world_size)
        for key, value, run_key in (
            ("train_micro_batch_size_per_gpu", t.micro_batch, "train.micro_batch"),
            ("gradient_accumulation_steps", gas,
             f"train.global_batch / (train.micro_batch x world size {world_size})"),
            ("train_batch_size", t.global_batch, "train.global_batch"),
            ("gradient_clipping", t.clip, "train.clip"),
        ):  # fmt: skip
            self.match(ds, key, key, value, run_key)
        if "bfloat16" in ds and "bf16" not in ds:  # DeepSpeed's other spelling of the section
            ds["bf16"] = ds.pop("bfloat16")
        self.match(self.section("bf16", {}), "enabled", "bf16.enabled", t.bf16, "train.bf16")
        for section in ("fp16", "amp"):  # the run config has no fp16/amp: "auto" means off
            node = self.section(section)
            if node is not None:
                if node.get("enabled") == AUTO:
                    node["enabled"] = False
                if node.get("enabled") is True:
                    raise self.fail(
                        f"{section}.enabled=true conflicts with the run config "
                        f"(train.bf16={str(t.bf16).lower()}; {section} is not supported): "
                        'set it to "auto" or false'
                    )

    # ------------------------------------------------------------ optimizer

    def optimizer(self) -> None:
        """No section: the run config's AdamW, as HF's Trainer builds its own. A section must be
        AdamW whose parameters are "auto", absent or equal to the run config's."""
        t = self.train
        opt = self.section("optimizer", {"type": "AdamW", "params": {}})
        assert opt is not None
        kind = opt.get("type")
        if not isinstance(kind, str) or kind.lower() != "adamw":
            raise self.fail(
                f"optimizer.type={_show(kind)}: only AdamW is supported (the run config's train.lr, "
                "train.betas, train.adam_eps, train.weight_decay); remove the section or say AdamW"
            )
        params = opt.setdefault("params", {})
        if not isinstance(params, dict):
            raise self.fail(f"optimizer.params must be a JSON object, got {_show(params)}")
        if params.get("adam_w_mode", True) is not True:
            raise self.fail("optimizer.params.adam_w_mode=false: only AdamW is supported")
        params.pop("adam_w_mode", None)
        extra = sorted(set(params) - set(OPTIMIZER_PARAMS))
        if extra:
            raise self.fail(
                f"optimizer.params.{extra[0]} is not supported: the optimizer is AdamW"
                f"({', '.join(OPTIMIZER_PARAMS)})"
            )
        eps = t.adam_eps
        if eps is None:  # the JSON's explicit eps, else the default
            eps = params.get("eps", AUTO)
            eps = ADAM_EPS_DEFAULT if eps == AUTO else eps
        for key, value, run_key in (
            ("lr", t.lr, "train.lr"),
            ("betas", list(t.betas), "train.betas"),
            ("eps", eps, "train.adam_eps"),
            ("weight_decay", t.weight_decay, "train.weight_decay"),
        ):
            self.match(params, key, f"optimizer.params.{key}", value, run_key)

    # ------------------------------------------------------------ scheduler

    def scheduler(self) -> None:
        """Mapped onto the run config's schedule (ds_setup.lr_lambda: linear warmup over
        train.warmup_steps, cosine from train.lr to train.min_lr at train.decay_steps or
        train.max_steps, flat afterwards), or refused naming what differs."""
        if "scheduler" not in self.ds:
            return
        t = self.train
        block = self.section("scheduler")
        assert block is not None
        kind = block.get("type")
        if kind not in SCHEDULERS:
            raise self.fail(
                f"scheduler.type={_show(kind)}: only {', '.join(SCHEDULERS)} map onto the run's "
                "warmup + cosine schedule; remove the block to use train.warmup_steps/train.min_lr"
            )
        if kind == "WarmupDecayLR":
            raise self.fail(
                "scheduler.type=WarmupDecayLR decays linearly to 0; the run config decays by "
                f"cosine to train.min_lr={t.min_lr}: use WarmupCosineLR or remove the block"
            )
        if kind == "WarmupLR" and t.min_lr != t.lr:
            raise self.fail(
                f"scheduler.type=WarmupLR holds the lr after warmup; the run config decays it by "
                f"cosine from train.lr={t.lr} to train.min_lr={t.min_lr}: use WarmupCosineLR, "
                "remove the block, or set train.min_lr to train.lr"
            )
        params = block.setdefault("params", {})
        if not isinstance(params, dict):
            raise self.fail(f"scheduler.params must be a JSON object, got {_show(params)}")
        extra = sorted(set(params) - set(SCHEDULER_PARAMS[kind]) - {"last_batch_iteration"})
        if extra:
            raise self.fail(f"scheduler.params.{extra[0]} is not a parameter of {kind}")
        if params.get("last_batch_iteration", -1) != -1:
            raise self.fail(
                "scheduler.params.last_batch_iteration must be -1: a resumed run restores the "
                "schedule from its checkpoint"
            )
        decay = t.decay_steps or t.max_steps
        values = {
            "warmup_min_lr": (0.0, "the run's warmup start"),
            "warmup_max_lr": (t.lr, "train.lr"),
            "warmup_min_ratio": (0.0, "the run's warmup start"),
            "warmup_num_steps": (t.warmup_steps, "train.warmup_steps"),
            "warmup_type": ("linear", "the run's warmup"),
            "total_num_steps": (decay, "train.decay_steps or train.max_steps"),
            "cos_min_ratio": (t.min_lr / t.lr, "train.min_lr / train.lr"),
        }
        for key in SCHEDULER_PARAMS[kind]:
            value, run_key = values[key]
            self.match(params, key, f"scheduler.params.{key}", value, run_key)

    # ------------------------------------------------------------ ZeRO, offload

    def zero(self, hidden_size: int | None, on_cpu: bool) -> None:
        zero = self.section("zero_optimization")
        if zero is None:
            return
        stage = zero.get("stage", 0)
        if stage not in (0, 1, 2, 3):
            raise self.fail(f"zero_optimization.stage={_show(stage)}: give the ZeRO stage (0-3)")
        offloads = [
            k for k in ("offload_optimizer", "offload_param")
            if isinstance(zero.get(k), dict) and zero[k].get("device", "none") != "none"
        ]  # fmt: skip
        if on_cpu:
            for k in offloads:
                del zero[k]
                log.warning(
                    "%s: zero_optimization.%s dropped: this run trains on the CPU, where "
                    "offloading to the CPU means nothing", self.where, k,
                )  # fmt: skip
        elif "offload_param" in offloads and stage != 3:
            raise self.fail(
                f"zero_optimization.offload_param needs ZeRO stage 3 (stage is {stage}); "
                "remove the block or use stage 3"
            )
        autos = [k for k in HIDDEN_SIZE_KEYS if zero.get(k) == AUTO]
        if not autos:
            return
        if hidden_size is None:
            raise self.fail(
                f'zero_optimization.{autos[0]}="auto" needs the model\'s hidden size, which its '
                "config does not give; replace it with a number"
            )
        if zero.get("reduce_bucket_size") == AUTO:
            zero["reduce_bucket_size"] = hidden_size * hidden_size
        if stage == 3:  # as HF: other stages leave them "auto", refused by resolve()
            if zero.get("stage3_prefetch_bucket_size") == AUTO:
                zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden_size * hidden_size)
            if zero.get("stage3_param_persistence_threshold") == AUTO:
                zero["stage3_param_persistence_threshold"] = 10 * hidden_size


def _show(value: Any) -> str:
    """A value as the JSON spells it (true, "log", [0.9, 0.999])."""
    return json.dumps(value)


def _same(a: Any, b: Any) -> bool:
    """Equal as config values: numbers within float rounding (1e-3 read from JSON vs 0.001)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def hf_hidden_size(config: Any) -> int | None:
    """The hidden size HF's Trainer uses for the "auto" bucket sizes: ``hidden_size``, else the
    largest of ``hidden_sizes``, else the same of ``text_config`` (LLaVA: the language model's)."""
    for node in (config, getattr(config, "text_config", None)):
        if node is None:
            continue
        if getattr(node, "hidden_size", None) is not None:
            return int(node.hidden_size)
        if getattr(node, "hidden_sizes", None):
            return int(max(node.hidden_sizes))
    return None
