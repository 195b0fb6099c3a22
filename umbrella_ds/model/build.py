"""build_model: preset or local pretrained directory -> patched, frozen, verified LLaVA + tokenizer.

No code path downloads: pretrained weights and tokenizers come from local directories only
(`local_files_only=True`). DeepSpeed is never imported here; the training code passes
`zero3_init` (e.g. `lambda: deepspeed.zero.Init(config_dict_or_path=ds_cfg)`) so large
random-init models are constructed partitioned. For *pretrained* weights under ZeRO-3 the
caller must also keep a `transformers.integrations.HfDeepSpeedConfig(ds_config)` alive around
build_model, which is how `from_pretrained` loads straight into partitions: the engine does so
with `train.ds_setup.zero3_pretrained_loading` (tests/model/test_model_zero3.py).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.initialization import no_init_weights
from transformers.integrations.deepspeed import (
    initialize_weights_zero3,
    is_deepspeed_zero3_enabled,
    prevent_arange_dtype_change,
)

from umbrella_ds import modality
from umbrella_ds.data.template import select_template
from umbrella_ds.model.llava import (
    enable_activation_checkpointing,
    freeze_all_but_patch_embed,
    parameter_table,
    splice_patch_embed,
)
from umbrella_ds.model.patch_embed import ModalitySpec, parse_modalities
from umbrella_ds.model.presets import get_preset, list_presets

log = logging.getLogger(__name__)
InitPath = Literal["whole", "zero3"]
PATCH_EMBED_STREAM = 7919  # seed offset of the patch embedding's initialisation (see build_model)

# Modalities used when a local directory does not record its own (config.mri_modalities).
DEFAULT_MODALITIES = {
    modality.T1.name: ModalitySpec(size=(32, 32, 32), patch=(8, 8, 8)),
    modality.RSFMRI.name: ModalitySpec(size=(32, 32, 32, 8), patch=(8, 8, 8, 4)),
}


def _resolve(source: str) -> tuple[str, Path | None]:
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face model directory)")
        return "dir", path
    if source in list_presets():
        return "preset", None
    raise ValueError(
        f"model source {source!r} is neither a preset ({list_presets()}) nor a local model directory"
    )


def _load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def build_model(
    source: str,
    *,
    modalities: Mapping[str, ModalitySpec | Mapping[str, object]] | None = None,
    init: Literal["random", "pretrained"] | None = None,
    dtype: torch.dtype = torch.float32,
    zero3_init: Callable[[], AbstractContextManager] | None = None,
    activation_checkpointing: tuple[bool, bool] = (False, False),
    seed: int | None = None,
    attn_implementation: str = "sdpa",
    init_path: InitPath = "whole",
) -> tuple[LlavaForConditionalGeneration, PreTrainedTokenizerBase | None]:
    """Build the patched LLaVA and its tokenizer.

    source: a preset name (`list_presets()`) or a local directory with config.json (+ weights).
    init: "random" (default for presets) or "pretrained" (default for directories; bf16 unless
        `dtype` says otherwise... callers pass dtype explicitly). A preset cannot be pretrained.
    modalities: MRI inputs of the patch embedding; default: the preset's, or the directory's
        `config.mri_modalities`, else DEFAULT_MODALITIES.
    zero3_init: factory of the context that constructs modules partitioned (deepspeed.zero.Init);
        the spliced patch embedding is created inside it too.
    activation_checkpointing: (vision tower, language model), non-reentrant.
    seed: seeds the random initialisation without touching the caller's global RNG state.
    init_path: how a random init draws the frozen base. "whole" is transformers' ordinary path;
        "zero3" is the path a partitioned build takes (modules constructed without init, then
        initialised module by module, as `initialize_weights_zero3` does on rank 0), which draws
        other values from the same seed. `zero3_init` implies "zero3"; passing it without
        DeepSpeed rebuilds, on one process, the base a ZeRO-3 run trained on (export, eval).

    Returns (model, tokenizer). The tokenizer is None for real architectures built randomly
    from a preset (their tokenizer ships with their weights; benchmarks feed token ids).
    """
    kind, path = _resolve(source)
    init = init or ("random" if kind == "preset" else "pretrained")
    if init not in ("random", "pretrained"):
        raise ValueError(f"init must be 'random' or 'pretrained', got {init!r}")
    tokenizer: PreTrainedTokenizerBase | None = None
    if kind == "preset":
        if init == "pretrained":
            raise ValueError(
                f"preset {source!r} ships no weights: pass a local directory holding them for init='pretrained'"
            )
        preset = get_preset(source)
        config = preset.make_config()
        default_mods = preset.modalities
        if preset.tokenizer_dir is not None:
            tokenizer = _load_tokenizer(preset.tokenizer_dir)
        else:
            log.info("preset %s ships no tokenizer: returning tokenizer=None", source)
    else:
        assert path is not None
        config = LlavaConfig.from_pretrained(str(path), local_files_only=True)
        default_mods = getattr(config, "mri_modalities", None) or DEFAULT_MODALITIES
        if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
            tokenizer = _load_tokenizer(path)
        else:
            log.warning("%s has no tokenizer files: returning tokenizer=None", path)
    # The base model's conversation template, checked against its tokenizer and config at build
    # time and recorded on the config, so render, evaluate and infer ask the same one (template_of).
    template = select_template(
        preset.chat_template if kind == "preset" else None, config=config, tokenizer=tokenizer
    )
    if tokenizer is not None:
        template.check_model(config, tokenizer)
    config.umbrella_chat_template = template.name
    mods = parse_modalities(modalities if modalities is not None else default_mods)
    for name, spec in mods.items():
        if any(spec.dropped):
            log.warning(
                "model.modalities.%s: patch %s does not divide size %s; as Conv3d floors, the "
                "trailing %s voxels per axis are unseen",
                name, list(spec.patch), list(spec.size), list(spec.dropped),
            )  # fmt: skip
    log.info("image tokens:\n%s", "\n".join(s.describe(m) for m, s in mods.items()))
    config._attn_implementation = attn_implementation  # read by from_pretrained/_from_config

    # HF partitions by itself when a HfDeepSpeedConfig is alive; otherwise, for a random init
    # under our zero3_init, do what HF does: skip per-module init on the (empty) partitions,
    # then initialise module by module on gathered parameters.
    manual_zero3 = zero3_init is not None and init == "random" and not is_deepspeed_zero3_enabled()
    if init_path not in ("whole", "zero3"):
        raise ValueError(f"init_path must be 'whole' or 'zero3', got {init_path!r}")
    replay_zero3 = init == "random" and init_path == "zero3" and zero3_init is None
    rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with rng:
        if seed is not None:
            torch.manual_seed(seed)
        with contextlib.ExitStack() as stack:
            if manual_zero3 or replay_zero3:
                stack.enter_context(no_init_weights())
                stack.enter_context(prevent_arange_dtype_change())
            if zero3_init is not None and (manual_zero3 or init == "random"):
                stack.enter_context(zero3_init())
            if init == "pretrained":
                model = LlavaForConditionalGeneration.from_pretrained(
                    str(path),
                    config=config,
                    dtype=dtype,
                    low_cpu_mem_usage=True,
                    local_files_only=True,
                )
            else:
                model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
        if manual_zero3:
            initialize_weights_zero3(model)
        elif replay_zero3:
            _initialize_weights_as_zero3(model)
        if seed is not None:
            # The trainable initialisation depends on the seed alone, not on how many random
            # numbers building the base model drew (that differs between loading whole and
            # loading into ZeRO-3 partitions, or random and pretrained init). A stream of its
            # own: reseeding with `seed` itself repeated the base model's first draws, and the
            # demo then did not learn (held-out accuracy 0.54, against 0.80 and 0.83 otherwise).
            torch.manual_seed(seed + PATCH_EMBED_STREAM)
        with zero3_init() if zero3_init is not None else contextlib.nullcontext():
            splice_patch_embed(model, mods)
    freeze_all_but_patch_embed(model)
    if any(activation_checkpointing):
        enable_activation_checkpointing(model, *activation_checkpointing)
    _, table = parameter_table(model)
    log.info("model %s (%s init), parameters:\n%s", source, init, table)
    return model, tokenizer


def random_init_path(zero3: bool, init: str) -> InitPath:
    """The init path a training run's frozen base is drawn by (recorded in its checkpoints)."""
    return "zero3" if zero3 and init == "random" else "whole"


def _initialize_weights_as_zero3(model: PreTrainedModel) -> None:
    """transformers' `initialize_weights_zero3` on one process: the same module order and the same
    `_initialize_weights` calls, on whole tensors instead of gathered partitions, so the same seed
    draws the same values as rank 0 did in a partitioned build (tests/model/test_model_zero3.py)."""
    from transformers.initialization import guard_torch_init_functions

    is_remote_code = model.is_remote_code()

    def apply(module: torch.nn.Module, fn: Callable) -> None:
        for child in module.children():
            if isinstance(child, PreTrainedModel):
                apply(child, child._initialize_weights)
            else:
                apply(child, fn)
        fn(module, is_remote_code)

    with torch.no_grad(), guard_torch_init_functions():
        apply(model, model._initialize_weights)


def count_parameters(source: str, *, patched: bool = False) -> int:
    """Total parameters of a preset's architecture, built on the meta device (no memory).

    patched=False counts the published architecture (original 2D patch embedding), which is
    what published totals refer to; patched=True counts the model as trained here.
    """
    preset = get_preset(source)
    config = preset.make_config()
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
        if patched:
            splice_patch_embed(model, preset.modalities)
    return sum(p.numel() for p in model.parameters())
