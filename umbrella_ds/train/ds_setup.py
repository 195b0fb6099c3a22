"""DeepSpeed settings in one place: ``ds_configs/*.json`` with ``"auto"`` filled from the run config.

The JSON files own ZeRO, offload and communication settings; the run config owns batch sizes,
AdamW, clipping, bf16 and the schedule. ``resolve_ds_config`` is the only function that joins them
(its rules, for HF-Trainer-style JSONs too, are in ``ds_resolve``), so no DeepSpeed constant is
scattered through the code. The optimizer is AdamW, built here over the trainable parameters only
(frozen ones in an optimizer cost memory and break ZeRO-1/2 partitioning): ``torch.optim.AdamW``,
or DeepSpeed's CPU Adam where the JSON offloads the optimizer. The schedule is our own warmup +
cosine ``LambdaLR``, so the learning rate written to metrics.jsonl is exactly the one the step used.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from umbrella_ds.config import DS_STAGES, ConfigError, TrainConfig
from umbrella_ds.train import ds_resolve

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"


def ds_config_path(name_or_path: str) -> Path:
    if name_or_path in DS_STAGES:
        return DS_CONFIG_DIR / f"{name_or_path}.json"
    return Path(name_or_path)


def load_ds_json(name_or_path: str) -> dict[str, Any]:
    path = ds_config_path(name_or_path)
    try:
        ds = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"train.deepspeed: cannot read {path}: {e}") from e
    if not isinstance(ds, dict):
        raise ConfigError(f"train.deepspeed: {path} holds a {type(ds).__name__}, not a JSON object")
    return ds


def resolve_ds_config(
    train: TrainConfig,
    world_size: int,
    *,
    hidden_size: int | None = None,
    on_cpu: bool | None = None,
    load_universal: bool = False,
) -> dict[str, Any]:
    """The JSON as this run uses it: every ``"auto"`` filled from ``train`` (and the model's
    ``hidden_size``, see `model_hidden_size`), no optimizer section filled with the run config's
    AdamW, a scheduler block mapped onto our schedule, offload dropped on the CPU (``on_cpu``,
    default: `env.on_cpu`), gradients reduced in fp32; anything that conflicts is a ConfigError
    naming both values. The rules: `ds_resolve`; docs/OPERATIONS.md, "DeepSpeed JSON"."""
    if on_cpu is None:
        from umbrella_ds.train.env import on_cpu as detect_cpu

        on_cpu = detect_cpu()
    ds = ds_resolve.resolve(
        copy.deepcopy(load_ds_json(train.deepspeed)),
        train,
        world_size,
        where=ds_config_path(train.deepspeed),
        hidden_size=hidden_size,
        on_cpu=on_cpu,
    )
    ds.setdefault("checkpoint", {})["load_universal"] = load_universal
    return ds


def model_hidden_size(source: str) -> int | None:
    """The hidden size HF derives "auto" bucket sizes from, read from the model's config alone
    (a preset's, or a local directory's config.json), before anything is built. None for a
    source that is neither: the build refuses it with its own message."""
    path = Path(source).expanduser()
    if (path / "config.json").is_file():
        from transformers import AutoConfig

        return ds_resolve.hf_hidden_size(
            AutoConfig.from_pretrained(str(path), local_files_only=True)
        )
    from umbrella_ds.model.presets import get_preset, list_presets

    if source in list_presets():
        return ds_resolve.hf_hidden_size(get_preset(source).make_config())
    return None


def offloads_optimizer(ds: dict[str, Any]) -> bool:
    """ZeRO keeps the optimizer state and step on the CPU (or NVMe): DeepSpeed's CPU Adam steps it."""
    off = ds.get("zero_optimization", {}).get("offload_optimizer") or {}
    return off.get("device", "none") in ("cpu", "nvme")


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def lr_lambda(train: TrainConfig) -> Callable[[int], float]:
    """Multiplier of train.lr for the update with index ``s`` (0-based): linear warmup over
    ``warmup_steps`` updates, then cosine from lr down to min_lr at ``decay_steps`` (default
    max_steps), flat afterwards."""
    warmup = train.warmup_steps
    decay = train.decay_steps or train.max_steps
    floor = train.min_lr / train.lr

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        progress = min(1.0, (s - warmup) / max(1, decay - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_optimizer(
    model: torch.nn.Module, train: TrainConfig, ds: dict[str, Any]
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("the model has no trainable parameters")
    p = ds["optimizer"]["params"]
    kwargs = dict(lr=p["lr"], betas=tuple(p["betas"]), eps=p["eps"], weight_decay=p["weight_decay"])
    opt: torch.optim.Optimizer
    if offloads_optimizer(ds):
        # The step runs on the CPU, where DeepSpeed's vectorised CPU Adam is the fast one; with
        # it, DeepSpeed's zero_force_ds_cpu_optimizer check (left at its default, true) passes,
        # and it still refuses a slow torch optimizer paired with offload.
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opt = DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)
    else:
        opt = torch.optim.AdamW(params, **kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(train))
    return opt, sched


@contextlib.contextmanager
def zero3_pretrained_loading(ds: dict[str, Any]) -> Iterator[None]:
    """While open, transformers' ``from_pretrained`` builds the model partitioned and loads the
    weights into the partitions (rank 0 reads the files, each layer is gathered, filled and
    re-partitioned), as HF's Trainer arranges with the same object.

    Without it a pretrained model under ZeRO-3 was loaded whole on every rank and partitioned only
    by ``deepspeed.initialize``: for the 34B preset (``configs/34b_zero3.yaml``) 136 GB of fp32
    weights per rank, 8 ranks to a node. The global HF reads is a weak reference, so the object is
    held here and dropped on exit: nothing after the build sees ZeRO-3 "enabled" by accident.
    """
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    keep_alive = HfDeepSpeedConfig(ds)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del keep_alive


def initialize(model: torch.nn.Module, train: TrainConfig, ds: dict[str, Any]):
    """deepspeed.initialize with our optimizer and schedule; returns (engine, scheduler)."""
    import deepspeed

    opt, sched = build_optimizer(model, train, ds)
    # Ours are built above (the scheduler block, if any, was mapped onto lr_lambda's schedule).
    ds_for_engine = {k: v for k, v in ds.items() if k not in ("optimizer", "scheduler")}
    engine, _, _, sched = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=ds_for_engine
    )
    _USED[engine] = copy.deepcopy(ds)
    # DeepSpeed checks gradients for NaN/Inf (and skips the step, agreed across ranks) only in
    # bf16/fp16 mode; the engine relies on that skip for bad steps in fp32 too.
    if hasattr(engine.optimizer, "check_grad_overflow"):
        engine.optimizer.check_grad_overflow = True
    return engine, sched


# The resolved config of each engine `initialize` made, for the run's records (weakly held).
_USED: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def used_config(engine: Any) -> dict[str, Any]:
    """The DeepSpeed config ``engine`` runs with, as resolved (optimizer and scheduler included:
    DeepSpeed got the objects built from them): what the start record and provenance.json keep."""
    return copy.deepcopy(_USED[engine])


def loss_normaliser(global_loss_tokens: int, world_size: int, accumulation: int) -> float:
    """Divisor of each micro-batch's summed CE so that, after DeepSpeed scales each backward by
    1/accumulation and averages gradients over ranks, the gradient is that of
    (sum of CE over the global batch) / (supervised tokens of the global batch)."""
    if global_loss_tokens <= 0:
        raise RuntimeError("the global batch has no supervised tokens")
    return global_loss_tokens / (world_size * accumulation)
