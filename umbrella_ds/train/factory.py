"""The one model build: training, evaluation, export, `load_trained`, the micro-batch finder and the
benchmarks all get their patched LLaVA from here, and `build` is the only caller of `build_model`.

Why one place: the five builds there used to be had five precision rules, so the micro-batch
finder measured a model (`model.to(bf16)`, buffers cast too) other than the one training ran, and
a ZeRO-3 run's base could not be rebuilt for evaluation. The rules, each once:

- **Build dtype.** Random init is built in fp32, so a preset's initial values do not depend on
  `train.bf16`; pretrained weights in a bf16 run are read as bf16 (DeepSpeed casts them anyway,
  and it halves host memory while loading: 14 GB instead of 28 for a 7B).
- **Cast rule: DeepSpeed's.** A bf16 DeepSpeed engine casts every floating-point *parameter* to
  bf16 and leaves buffers alone (rotary `inv_freq` stays fp32). `cast_like_deepspeed` does exactly
  that for the one-process users (evaluation, inference, the finder), so their numbers are the
  training run's. `model.to(bf16)` would also cast the buffers and change the numbers.
- **Init path.** Under ZeRO-3 a random init is drawn partitioned, module by module, which draws
  other values from the same seed than a whole build (`model.build.random_init_path`); a rebuild
  of a ZeRO-3 run replays that path on one process.
- **Fingerprint.** `base_record` hashes the frozen base (gathered under ZeRO-3) with its init
  path: the record every checkpoint carries and every rebuild is checked against.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from umbrella_ds.config import ModelConfig, RunConfig
from umbrella_ds.model import build_model
from umbrella_ds.model.build import InitPath, random_init_path
from umbrella_ds.model.patch_embed_init import apply_config as apply_patch_embed_init
from umbrella_ds.train.base_weights import base_weights_sha256, check_same_base


@dataclass
class Built:
    """A built model with what was decided on the way (the engine logs and records these)."""

    model: Any  # LlavaForConditionalGeneration (possibly ZeRO-3 partitioned)
    tokenizer: Any
    dtype: torch.dtype
    init_path: InitPath


def modality_specs(model_cfg: ModelConfig) -> dict[str, dict[str, list[int]]]:
    """The run config's modalities in the form build_model and export.json take."""
    return {
        m: {"size": list(s.size), "patch": list(s.patch)} for m, s in model_cfg.modalities.items()
    }


def build_dtype(model_cfg: ModelConfig, bf16: bool) -> torch.dtype:
    """fp32 for a random init; the run's dtype for pretrained weights (see the module docstring)."""
    return torch.bfloat16 if bf16 and model_cfg.init_kind == "pretrained" else torch.float32


def build(
    source: str,
    *,
    modalities: Mapping[str, Any] | None = None,
    init: str | None = None,
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
    init_path: InitPath = "whole",
    zero3_init=None,
    activation_checkpointing: tuple[bool, bool] = (False, False),
):
    """(model, tokenizer): the single call of `build_model` (its arguments documented there)."""
    return build_model(
        source,
        modalities=modalities,
        init=init,  # type: ignore[arg-type]
        dtype=dtype,
        seed=seed,
        init_path=init_path,
        zero3_init=zero3_init,
        activation_checkpointing=activation_checkpointing,
    )


def build_for_run(cfg: RunConfig, ds_cfg: dict[str, Any] | None = None) -> Built:
    """The model a run trains: partitioned under ZeRO-3 (`ds_cfg` stage 3), pretrained weights
    loaded straight into the partitions, activation checkpointing as configured. Without `ds_cfg`:
    the same model on one process (the micro-batch finder)."""
    from umbrella_ds.train import ds_setup

    zero3 = ds_cfg is not None and ds_setup.zero_stage(ds_cfg) == 3
    pretrained = cfg.model.init_kind == "pretrained"
    dtype = build_dtype(cfg.model, cfg.train.bf16)
    zero3_init = None
    if zero3:
        import deepspeed

        def zero3_init():
            return deepspeed.zero.Init(config_dict_or_path=ds_cfg)

    loading = (
        ds_setup.zero3_pretrained_loading(ds_cfg)  # type: ignore[arg-type]
        if zero3 and pretrained
        else contextlib.nullcontext()
    )
    ck = cfg.model.checkpointing
    with loading:
        model, tokenizer = build(
            cfg.model.source,
            modalities=modality_specs(cfg.model),
            init=cfg.model.init,
            seed=cfg.train.seed,
            dtype=dtype,
            zero3_init=zero3_init,
            activation_checkpointing=(ck.vision, ck.language),
        )
    apply_patch_embed_init(model, cfg.model)  # model.patch_embed_init: a predecessor-trained one
    return Built(model, tokenizer, dtype, random_init_path(zero3, cfg.model.init_kind))


def base_record(built: Built) -> dict[str, str]:
    """The frozen base as this process sees it: sha256 (every rank together under ZeRO-3)."""
    return {"weights_sha256": base_weights_sha256(built.model), "init_path": built.init_path}


def rebuild_for_checkpoint(
    step_dir: Path,
    meta: Mapping[str, Any],
    base: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
):
    """(model, tokenizer, base record) of a checkpoint's run, rebuilt on one process.

    The base is drawn the way the run drew it and must hash to what the run recorded, or
    BaseMismatchError names both hashes. Checkpoints from before the record derive the init path
    from the run config and are not checked.
    """
    from umbrella_ds.config import config_from_dict
    from umbrella_ds.train.ds_setup import load_ds_json, zero_stage

    cfg = config_from_dict(meta["config"])
    recorded = dict(meta.get("base") or {})
    init_path = recorded.get("init_path") or random_init_path(
        zero_stage(load_ds_json(cfg.train.deepspeed)) == 3, cfg.model.init_kind
    )
    source = str(base) if base is not None else cfg.model.source
    model, tokenizer = build(
        source,
        modalities=modality_specs(cfg.model),
        init=cfg.model.init,
        seed=cfg.train.seed,
        dtype=dtype,
        init_path=init_path,
    )
    rebuilt = base_weights_sha256(model)
    check_same_base(
        recorded.get("weights_sha256"), rebuilt, what=str(step_dir), source=source,
        hint="pass --base with the base the run trained on",
    )  # fmt: skip
    return model, tokenizer, {"weights_sha256": rebuilt, "init_path": init_path}


def cast_like_deepspeed(model: torch.nn.Module, bf16: bool) -> None:
    """What DeepSpeed's bf16 engine does to the module: parameters to bf16, buffers untouched."""
    if not bf16:
        return
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != torch.bfloat16:
            p.data = p.data.to(torch.bfloat16)
