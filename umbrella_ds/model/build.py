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
    vision_transformer,
)
from umbrella_ds.model.patch_embed import ModalitySpec, MRIPatchEmbed, parse_modalities
from umbrella_ds.model.presets import get_preset, list_presets
from umbrella_ds.model.seeded_init import Access, init_by_name, whole_access

log = logging.getLogger(__name__)
# Draws a random base another way than seeded init: (config, dtype, seed) -> model. Only the
# legacy bases of records written before seeded init use one (train/legacy_init.py).
BaseConstructor = Callable[[LlavaConfig, torch.dtype, int], LlavaForConditionalGeneration]
PATCH_EMBED_STREAM = (
    7919  # seed offset of the patch embedding's initialisation (_patch_embed_values)
)

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
    zero3_access: Access | None = None,
    activation_checkpointing: tuple[bool, bool] = (False, False),
    seed: int | None = None,
    attn_implementation: str = "sdpa",
    construct_base: BaseConstructor | None = None,
) -> tuple[LlavaForConditionalGeneration, PreTrainedTokenizerBase | None]:
    """Build the patched LLaVA and its tokenizer.

    source: a preset name (`list_presets()`) or a local directory with config.json (+ weights).
    init: "random" (default for presets) or "pretrained" (default for directories; bf16 unless
        `dtype` says otherwise... callers pass dtype explicitly). A preset cannot be pretrained.
    modalities: MRI inputs of the patch embedding; default: the preset's, or the directory's
        `config.mri_modalities`, else DEFAULT_MODALITIES.
    zero3_init: factory of the context that constructs modules partitioned (deepspeed.zero.Init);
        the spliced patch embedding is created inside it too.
    zero3_access: with zero3_init, how the seeded init reaches partitioned parameters
        (`seeded_init.Access`: gather them, and say which rank writes).
    activation_checkpointing: (vision tower, language model), non-reentrant.
    seed: seeds the random initialisation (`seeded_init`: each tensor from (seed, its name)) and
        the patch embedding's, without touching the caller's RNG state; None draws one from it.
    construct_base: draws a random base instead of seeded init, on one process: the legacy
        bases of checkpoints and exports written before it (`ModelRecipe.build` passes
        `train.legacy_init.legacy_random_base`). Read-only: never for training.

    Returns (model, tokenizer). The tokenizer is None for a local directory without tokenizer
    files (real presets ship a stand-in of their vocabulary size, see presets.py).
    """
    kind, path = _resolve(source)
    init = init or ("random" if kind == "preset" else "pretrained")
    if init not in ("random", "pretrained"):
        raise ValueError(f"init must be 'random' or 'pretrained', got {init!r}")
    if construct_base is not None and (zero3_init is not None or seed is None):
        raise ValueError("construct_base rebuilds a recorded base on one process, with its seed")
    if zero3_init is not None and zero3_access is None:
        raise ValueError("zero3_init needs zero3_access (how the init reaches the partitions)")
    tokenizer: PreTrainedTokenizerBase | None = None
    if kind == "preset":
        if init == "pretrained":
            raise ValueError(
                f"preset {source!r} ships no weights: pass a local directory holding them for init='pretrained'"
            )
        preset = get_preset(source)
        config = preset.make_config()
        default_mods = preset.modalities
        tokenizer = preset.load_tokenizer()
    else:
        assert path is not None
        config = LlavaConfig.from_pretrained(str(path), local_files_only=True)
        default_mods = getattr(config, "mri_modalities", None) or DEFAULT_MODALITIES
        if has_tokenizer_files(path):
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

    if seed is None:  # a seed from the caller's RNG: unseeded builds still differ run to run
        seed = int(torch.randint(0, 2**62, ()))
    access = zero3_access or whole_access
    if construct_base is not None and init == "random":
        model = construct_base(config, dtype, seed)
    else:
        # HF partitions by itself when a HfDeepSpeedConfig is alive (pretrained under ZeRO-3).
        with contextlib.ExitStack() as stack:
            if init == "random":
                stack.enter_context(no_init_weights())  # drawn below, by name
                if zero3_init is not None:
                    stack.enter_context(prevent_arange_dtype_change())
            if zero3_init is not None and (init == "random" or not is_deepspeed_zero3_enabled()):
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
        if init == "random":
            model.tie_weights()  # post_init ties only when it also initialises
            init_by_name(model, seed, access)
    _splice_seeded_patch_embed(model, mods, seed, zero3_init, access)
    freeze_all_but_patch_embed(model)
    if any(activation_checkpointing):
        enable_activation_checkpointing(model, *activation_checkpointing)
    _, table = parameter_table(model)
    log.info("model %s (%s init), parameters:\n%s", source, init, table)
    return model, tokenizer


def has_tokenizer_files(path: Path) -> bool:
    """Whether a local model directory holds a tokenizer (training needs one)."""
    return (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file()


def tokenizer_problem(source: str) -> str | None:
    """Why `source` has no tokenizer to train with (checked before anything is built), or None."""
    kind, path = _resolve(source)
    if kind == "preset":
        preset = get_preset(source)
        if preset.tokenizer_dir is None and preset.stand_in is None:
            return f"preset {source!r} ships no tokenizer (nor a stand_in_tokenizer); training needs one"
        return None
    assert path is not None
    if not has_tokenizer_files(path):
        return f"{path} holds no tokenizer (tokenizer.json / tokenizer_config.json); training needs one"
    return None


def _patch_embed_values(
    mods: Mapping[str, ModalitySpec], width: int, seed: int
) -> dict[str, torch.Tensor]:
    """The patch embedding's initial values: MRIPatchEmbed's own init rules, drawn on the CPU from
    the stream `seed + PATCH_EMBED_STREAM`. The trainable initialisation depends on the seed alone,
    not on how the base was built. A stream of its own: reseeding with `seed` itself repeated the
    base model's first draws, and the demo then did not learn (held-out accuracy 0.54, against 0.80
    and 0.83 otherwise)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed + PATCH_EMBED_STREAM)
        twin = MRIPatchEmbed(mods, width)
    return {n: p.detach() for n, p in twin.named_parameters()}


def _splice_seeded_patch_embed(
    model: PreTrainedModel,
    mods: Mapping[str, ModalitySpec],
    seed: int,
    zero3_init: Callable[[], AbstractContextManager] | None,
    access: Access,
) -> None:
    """Splice the patch embedding (partitioned under zero3_init) and give it its seeded values."""
    with no_init_weights(), zero3_init() if zero3_init is not None else contextlib.nullcontext():
        patch = splice_patch_embed(model, mods)
    values = _patch_embed_values(mods, int(vision_transformer(model).config.hidden_size), seed)
    params = dict(patch.named_parameters())
    with torch.no_grad(), access(list(params.values()), 0) as writes:
        if writes:
            for name, p in params.items():
                p.copy_(values[name])
