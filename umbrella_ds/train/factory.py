"""The model a run trains, and the rules every build follows. Training and the micro-batch finder
build through `build_for_run`; evaluation, export, inference and `load_trained` rebuild a trained
model through `train/trained.py`; both go through `ModelRecipe.build` (model/recipe.py), the one
caller of `build_model`.

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
  by the legacy path they were drawn by (`train/legacy_init.py`), read-only: evaluated and
  exported, never resumed.
- **Fingerprint.** `base_record` hashes the frozen base once (`base_weights`, scheme
  `bf16-tensors-v1`, one rank hashing); `run_recipe` puts it in the run's ModelRecipe, which every
  checkpoint carries and every rebuild is checked against, in the scheme the record names.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from umbrella_ds.config import ModelConfig, RunConfig
from umbrella_ds.data.template import template_of
from umbrella_ds.model.patch_embed_init import apply_config as apply_patch_embed_init
from umbrella_ds.model.recipe import ModelRecipe
from umbrella_ds.model.seeded_init import INIT_SCHEME
from umbrella_ds.train.base_weights import HASH_SCHEME, BaseMismatchError, base_hash, check_base
from umbrella_ds.train.trained import recipe_for_config


@dataclass
class Built:
    """A built model with what was decided on the way (the engine logs and records these)."""

    model: Any  # LlavaForConditionalGeneration (possibly ZeRO-3 partitioned)
    tokenizer: Any
    dtype: torch.dtype


def build_dtype(model_cfg: ModelConfig, bf16: bool) -> torch.dtype:
    """fp32 for a random init; the run's dtype for pretrained weights (see the module docstring)."""
    return torch.bfloat16 if bf16 and model_cfg.init_kind == "pretrained" else torch.float32


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
        model, tokenizer = recipe_for_config(cfg).build(
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


def run_recipe(cfg: RunConfig, built: Built, base: dict[str, str]) -> ModelRecipe:
    """The ModelRecipe of a run's model (`base`: its `base_record`), saved with every checkpoint
    and carried by every export of it."""
    return recipe_for_config(cfg).with_base(**base, template=template_of(built.model).name)


def check_resume_base(
    recorded: ModelRecipe, built: Built, base: dict[str, str], cfg: RunConfig, *, what: str
) -> None:
    """A resume continues on the base the checkpoint trained on (`recorded`: the checkpoint's
    recipe, `trained.recipe_of`; `base`: this build's record). A legacy random base is not
    redrawn for training: evaluation and export still rebuild it. Checkpoints from before the
    base record are not checked."""
    hint = "resume with the base the checkpoint was trained on, or start a new output_dir"
    if cfg.model.init_kind == "random" and recorded.weights_sha256 and recorded.init_path:
        raise BaseMismatchError(
            f"{what} was trained on a random base drawn before seeded init (init_path "
            f"{recorded.init_path}); this version draws {cfg.model.source!r} "
            "otherwise from the same seed and does not redraw old bases for training: finish that "
            "run with the version that wrote it, or start a new output_dir (umbrella-eval and "
            "umbrella-export still rebuild it)"
        )
    check_base(
        recorded.base_record(), built.model, what=what, source=cfg.model.source, hint=hint,
        known={base["hash_scheme"]: base["weights_sha256"]},
    )  # fmt: skip


def cast_like_deepspeed(model: torch.nn.Module, bf16: bool) -> None:
    """What DeepSpeed's bf16 engine does to the module: parameters to bf16, buffers untouched."""
    if not bf16:
        return
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != torch.bfloat16:
            p.data = p.data.to(torch.bfloat16)
