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
- **Random init: one base however it is built.** Each tensor is drawn on the CPU from (seed, its
  name) and copied into the whole or partitioned parameter (`model.seeded_init`), so ZeRO-0/1/2/3,
  one process or many, CPU or CUDA give the same base; a rebuild needs no knowledge of how the run
  was built. Bases drawn before (records with an `init_path` and no `init_scheme`) are rebuilt
  by the legacy path they were drawn by, read-only: evaluated and exported, never resumed.
- **Fingerprint.** `base_record` hashes the frozen base once (`base_weights`, scheme
  `bf16-tensors-v1`, one rank hashing): the record every checkpoint carries and every rebuild is
  checked against, in the scheme the record names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from umbrella_ds.config import ModelConfig, RunConfig
from umbrella_ds.errors import UserError
from umbrella_ds.model import build_model
from umbrella_ds.model.build import InitPath, random_init_path
from umbrella_ds.model.patch_embed_init import apply_config as apply_patch_embed_init
from umbrella_ds.model.seeded_init import INIT_SCHEME
from umbrella_ds.train.base_weights import (
    HASH_SCHEME,
    BaseMismatchError,
    base_hash,
    check_base,
)


@dataclass
class Built:
    """A built model with what was decided on the way (the engine logs and records these)."""

    model: Any  # LlavaForConditionalGeneration (possibly ZeRO-3 partitioned)
    tokenizer: Any
    dtype: torch.dtype


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
    legacy_init_path: InitPath | None = None,
    zero3_init=None,
    zero3_access=None,
    activation_checkpointing: tuple[bool, bool] = (False, False),
):
    """(model, tokenizer): the single call of `build_model` (its arguments documented there)."""
    return build_model(
        source,
        modalities=modalities,
        init=init,  # type: ignore[arg-type]
        dtype=dtype,
        seed=seed,
        legacy_init_path=legacy_init_path,
        zero3_init=zero3_init,
        zero3_access=zero3_access,
        activation_checkpointing=activation_checkpointing,
    )


def gathered_for_init(params, index: int):
    """Seeded init under ZeRO-3: gather a module's partitions; one rank writes them (round-robin
    over modules, so the drawing is shared) and DeepSpeed scatters its values on exit."""
    import deepspeed

    writer = index % torch.distributed.get_world_size()

    @contextlib.contextmanager
    def gathered():
        with deepspeed.zero.GatheredParameters(list(params), modifier_rank=writer):
            yield torch.distributed.get_rank() == writer

    return gathered()


def build_for_run(cfg: RunConfig, ds_cfg: dict[str, Any] | None = None) -> Built:
    """The model a run trains: partitioned under ZeRO-3 (`ds_cfg` stage 3), pretrained weights
    loaded straight into the partitions, activation checkpointing as configured. Without `ds_cfg`:
    the same model on one process (the micro-batch finder)."""
    from umbrella_ds.train import ds_setup

    zero3 = ds_cfg is not None and ds_setup.zero_stage(ds_cfg) == 3
    pretrained = cfg.model.init_kind == "pretrained"
    dtype = build_dtype(cfg.model, cfg.train.bf16)
    zero3_init = zero3_access = None
    if zero3:
        import deepspeed

        def zero3_init():
            return deepspeed.zero.Init(config_dict_or_path=ds_cfg)

        zero3_access = gathered_for_init

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
            zero3_access=zero3_access,
            activation_checkpointing=(ck.vision, ck.language),
        )
    apply_patch_embed_init(model, cfg.model)  # model.patch_embed_init: a predecessor-trained one
    return Built(model, tokenizer, dtype)


def base_record(built: Built) -> dict[str, str]:
    """The frozen base's record (every rank together: one hashes, all get it), saved with every
    checkpoint and export: its hash, the hash's scheme and the random init's scheme."""
    return {
        "weights_sha256": base_hash(built.model),
        "hash_scheme": HASH_SCHEME,
        "init_scheme": INIT_SCHEME,
    }


def recorded_init_path(
    recorded: Mapping[str, Any], cfg: RunConfig | None, *, init_path: str | None = None
) -> InitPath | None:
    """How the base of a record was drawn: None for seeded init (records with `init_scheme`), else
    the legacy path: the record's `init_path` (or an export's), or for records from before it,
    the one the run config implies."""
    scheme = recorded.get("init_scheme")
    if scheme == INIT_SCHEME:
        return None
    if scheme is not None:
        raise UserError(
            f"base init scheme {scheme!r} is unknown to this version (it knows {INIT_SCHEME!r} and "
            "the legacy paths): the record was written by a newer umbrella-ds"
        )
    path = recorded.get("init_path") or init_path
    if path is None and cfg is not None:
        from umbrella_ds.train.ds_setup import load_ds_json, zero_stage

        path = random_init_path(
            zero_stage(load_ds_json(cfg.train.deepspeed)) == 3, cfg.model.init_kind
        )
    if path is None:
        path = "whole"
    if path not in ("whole", "zero3"):
        raise UserError(f"base init_path {path!r} is unknown (whole | zero3)")
    return path  # type: ignore[return-value]


def check_resume_base(
    recorded: Mapping[str, Any] | None,
    built: Built,
    base: Mapping[str, str],
    cfg: RunConfig,
    *,
    what: str,
) -> None:
    """A resume continues on the base the checkpoint trained on (`base`: this build's record).
    A legacy random base is not redrawn for training: evaluation and export still rebuild it."""
    recorded = recorded or {}
    hint = "resume with the base the checkpoint was trained on, or start a new output_dir"
    if cfg.model.init_kind == "random" and recorded and recorded_init_path(recorded, cfg):
        raise BaseMismatchError(
            f"{what} was trained on a random base drawn before seeded init (init_path "
            f"{recorded.get('init_path', '?')}); this version draws {cfg.model.source!r} "
            "otherwise from the same seed and does not redraw old bases for training: finish that "
            "run with the version that wrote it, or start a new output_dir (umbrella-eval and "
            "umbrella-export still rebuild it)"
        )
    check_base(
        recorded, built.model, what=what, source=cfg.model.source, hint=hint,
        known={base["hash_scheme"]: base["weights_sha256"]},
    )  # fmt: skip


def rebuild_for_checkpoint(
    step_dir: Path,
    meta: Mapping[str, Any],
    base: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
):
    """(model, tokenizer, base record) of a checkpoint's run, rebuilt on one process.

    The base is drawn as the run drew it (seeded init, or the legacy path of an older record) and
    must hash, in the record's scheme, to what the run recorded, or BaseMismatchError names both
    hashes. Checkpoints from before the record derive the init path from the run config and are
    not checked. The returned record is the one an export of this base carries.
    """
    from umbrella_ds.config import config_from_dict

    cfg = config_from_dict(meta["config"])
    recorded = dict(meta.get("base") or {})
    source = str(base) if base is not None else cfg.model.source
    legacy = recorded_init_path(recorded, cfg)
    model, tokenizer = build(
        source,
        modalities=modality_specs(cfg.model),
        init=cfg.model.init,
        seed=cfg.train.seed,
        dtype=dtype,
        legacy_init_path=legacy,
    )
    rebuilt = check_base(
        recorded, model, what=str(step_dir), source=source,
        hint="pass --base with the base the run trained on",
    )  # fmt: skip
    return model, tokenizer, _rebuilt_record(recorded, rebuilt, legacy)


def _rebuilt_record(recorded: Mapping[str, Any], rebuilt: str, legacy: InitPath | None) -> dict:
    """The record of a rebuilt base, in the scheme it was checked in (legacy stays legacy)."""
    if legacy is None:
        return {"weights_sha256": rebuilt, "hash_scheme": recorded.get("hash_scheme", HASH_SCHEME),
                "init_scheme": INIT_SCHEME}  # fmt: skip
    out = {"weights_sha256": rebuilt, "init_path": legacy}
    if "hash_scheme" in recorded:
        out["hash_scheme"] = recorded["hash_scheme"]
    return out


def rebuild_for_export(
    info: Mapping[str, Any],
    base: str | Path | None,
    dtype: torch.dtype,
    *,
    what: str,
    verify: bool = True,
):
    """(model, tokenizer) of an export's base: drawn as recorded (`export.json`'s `base` holds
    the record; exports before seeded init have a top-level `init_path`), checked if `verify`."""
    recorded = dict(info["base"])
    source = str(base) if base is not None else (recorded["path"] or recorded["preset"])
    legacy = recorded_init_path(recorded, None, init_path=info.get("init_path", "whole"))
    model, tokenizer = build(
        source,
        modalities=info["modalities"],
        init=info["init"],
        dtype=dtype,
        seed=info["seed"],
        legacy_init_path=legacy,
    )
    if verify:
        trained_on = recorded["preset"] or recorded["path"]
        check_base(
            recorded, model, what=f"{what} (base {trained_on})", source=source,
            hint="point --base at the base the run trained with",
        )  # fmt: skip
    return model, tokenizer


def cast_like_deepspeed(model: torch.nn.Module, bf16: bool) -> None:
    """What DeepSpeed's bf16 engine does to the module: parameters to bf16, buffers untouched."""
    if not bf16:
        return
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != torch.bfloat16:
            p.data = p.data.to(torch.bfloat16)
