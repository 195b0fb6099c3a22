"""DeepSpeed settings in one place: ``ds_configs/*.json`` with ``"auto"`` filled from the run config.

The JSON files own ZeRO and precision settings; the run config owns batch sizes, learning rate,
clipping and bf16. ``resolve_ds_config`` is the only function that joins them, so no DeepSpeed
constant is scattered through the code. The optimizer is the JSON's AdamW, built here as
``torch.optim.AdamW`` over the trainable parameters only (frozen ones in an optimizer cost memory
and break ZeRO-1/2 partitioning); the schedule is our own warmup + cosine ``LambdaLR``, so the
learning rate written to metrics.jsonl is exactly the one the step used.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from umbrella_ds.config import DS_STAGES, ConfigError, TrainConfig

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"


def ds_config_path(name_or_path: str) -> Path:
    if name_or_path in DS_STAGES:
        return DS_CONFIG_DIR / f"{name_or_path}.json"
    return Path(name_or_path)


def load_ds_json(name_or_path: str) -> dict[str, Any]:
    path = ds_config_path(name_or_path)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"train.deepspeed: cannot read {path}: {e}") from e


def resolve_ds_config(
    train: TrainConfig, world_size: int, *, load_universal: bool = False
) -> dict[str, Any]:
    """The JSON with every ``"auto"`` replaced from ``train``; explicit conflicting values are errors."""
    ds = copy.deepcopy(load_ds_json(train.deepspeed))
    gas = train.accumulation(world_size)
    values = {
        ("train_micro_batch_size_per_gpu",): train.micro_batch,
        ("gradient_accumulation_steps",): gas,
        ("train_batch_size",): train.global_batch,
        ("gradient_clipping",): train.clip,
        ("bf16", "enabled"): train.bf16,
        ("optimizer", "params", "lr"): train.lr,
        ("optimizer", "params", "betas"): list(train.betas),
        ("optimizer", "params", "weight_decay"): train.weight_decay,
    }
    for keys, value in values.items():
        node = ds
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        current = node.get(keys[-1], "auto")
        if current == "auto":
            node[keys[-1]] = value
        elif current != value:
            raise ConfigError(
                f"{ds_config_path(train.deepspeed)}: {'.'.join(keys)}={current!r} conflicts with "
                f'the run config ({value!r}); set it to "auto"'
            )
    opt_type = ds.get("optimizer", {}).get("type")
    if opt_type != "AdamW":
        raise ConfigError(f"{ds_config_path(train.deepspeed)}: optimizer.type must be AdamW")
    if "scheduler" in ds:
        raise ConfigError(
            f"{ds_config_path(train.deepspeed)}: remove 'scheduler'; the schedule is train.warmup_steps/"
            "train.lr/train.min_lr (warmup + cosine)"
        )
    ds.setdefault("checkpoint", {})["load_universal"] = load_universal
    return ds


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
    opt_params = dict(ds["optimizer"]["params"])
    opt = torch.optim.AdamW(
        params,
        lr=opt_params["lr"],
        betas=tuple(opt_params["betas"]),
        eps=opt_params.get("eps", 1e-8),
        weight_decay=opt_params["weight_decay"],
    )
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
    ds_for_engine = {k: v for k, v in ds.items() if k != "optimizer"}
    engine, _, _, sched = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=ds_for_engine
    )
    # DeepSpeed checks gradients for NaN/Inf (and skips the step, agreed across ranks) only in
    # bf16/fp16 mode; the engine relies on that skip for bad steps in fp32 too.
    if hasattr(engine.optimizer, "check_grad_overflow"):
        engine.optimizer.check_grad_overflow = True
    return engine, sched


def loss_normaliser(global_loss_tokens: int, world_size: int, accumulation: int) -> float:
    """Divisor of each micro-batch's summed CE so that, after DeepSpeed scales each backward by
    1/accumulation and averages gradients over ranks, the gradient is that of
    (sum of CE over the global batch) / (supervised tokens of the global batch)."""
    if global_loss_tokens <= 0:
        raise RuntimeError("the global batch has no supervised tokens")
    return global_loss_tokens / (world_size * accumulation)
