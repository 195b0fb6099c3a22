"""The patched LLaVA: splice, freeze, describe, and the forward paths training uses.

Everything here finds modules by structure (transformers 5.x `model.model.vision_tower`, 4.x
`vision_tower.vision_model` nesting, CLIP or SigLIP towers) and calls submodules as modules, so
DeepSpeed ZeRO-3's gather hooks fire. The training forward does not go through HF's
`pixel_values` path: images of several modalities and per-sample counts are embedded
explicitly and copied into host-built flat positions (no boolean masks on the device), and
logits are computed only at supervised positions.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from umbrella_ds.model.patch_embed import ModalitySpec, MRIPatchEmbed

log = logging.getLogger(__name__)


# --- locating the parts ---------------------------------------------------------------------
def _base(model: nn.Module) -> nn.Module:
    """LlavaModel in 5.x (`model.model`), the model itself in 4.x layouts."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "vision_tower"):
        return inner
    if hasattr(model, "vision_tower"):
        return model
    raise TypeError(f"{type(model).__name__} has no vision_tower (not a LLaVA model?)")


def vision_tower(model: nn.Module) -> nn.Module:
    """The module whose forward runs the vision encoder (what HF Llava calls)."""
    return _base(model).vision_tower


def vision_transformer(model: nn.Module) -> nn.Module:
    """The module that owns `.embeddings` (the tower itself in 5.x, `.vision_model` in 4.x)."""
    tower = vision_tower(model)
    inner = getattr(tower, "vision_model", tower)
    if not hasattr(inner, "embeddings"):
        raise TypeError(f"vision tower {type(tower).__name__} has no embeddings module to replace")
    return inner


def find_patch_embed(model: nn.Module) -> MRIPatchEmbed:
    emb = vision_transformer(model).embeddings
    if not isinstance(emb, MRIPatchEmbed):
        raise TypeError(
            f"vision tower embeddings are {type(emb).__name__}, not MRIPatchEmbed: call splice_patch_embed first"
        )
    return emb


def projector(model: nn.Module) -> nn.Module:
    return _base(model).multi_modal_projector


def language_model(model: nn.Module) -> nn.Module:
    """The decoder stack returning hidden states (Qwen2Model / LlamaModel)."""
    lm = _base(model).language_model
    # 4.x kept a *ForCausalLM here; its decoder is `.model`.
    return lm.model if hasattr(lm, "lm_head") and hasattr(lm, "model") else lm


def lm_head(model: nn.Module) -> nn.Module:
    head = getattr(model, "lm_head", None)
    if head is None:
        head = _base(model).language_model.lm_head
    return head


def image_token_id(model: nn.Module) -> int:
    cfg = model.config
    value = getattr(cfg, "image_token_id", None)
    if value is None:
        value = cfg.image_token_index
    return int(value)


def num_image_tokens(model: nn.Module, modality: str) -> int:
    """Tokens one image of `modality` occupies, asked of the patch embedding."""
    return find_patch_embed(model).num_tokens(modality)


# --- splice and freeze ----------------------------------------------------------------------
def splice_patch_embed(
    model: nn.Module, modalities: Mapping[str, ModalitySpec | Mapping[str, object]]
) -> MRIPatchEmbed:
    """Replace the tower's 2D patch embedding by an MRIPatchEmbed of the tower's width.

    Also sets `vision_feature_select_strategy="full"`: the MRI embedding has no CLS token, so
    every tower output is an image token (CLIP's "default" would crop one).
    The new module is created in the caller's context (e.g. deepspeed.zero.Init), so under
    ZeRO-3 it is partitioned like the rest.
    """
    vt = vision_transformer(model)
    embed_dim = int(vt.config.hidden_size)
    ref = next(model.parameters())
    patch = MRIPatchEmbed(modalities, embed_dim)
    if not hasattr(ref, "ds_id") and ref.device.type != "meta":
        patch = patch.to(device=ref.device, dtype=ref.dtype)
    vt.embeddings = patch
    model.config.vision_feature_select_strategy = "full"
    model.config.mri_modalities = {m: s.to_dict() for m, s in patch.specs.items()}
    return patch


def freeze_all_but_patch_embed(model: nn.Module) -> None:
    """requires_grad=False everywhere, then True on exactly the patch embedding; verified."""
    patch = find_patch_embed(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in patch.parameters():
        p.requires_grad_(True)
    verify_trainable(model)


def verify_trainable(model: nn.Module) -> None:
    """Raise unless the trainable set is exactly the patch embedding's parameters (by identity)."""
    expected = {id(p) for p in find_patch_embed(model).parameters()}
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    if trainable != expected:
        extra = sorted(names.get(i, "?") for i in trainable - expected)
        missing = sorted(names.get(i, "?") for i in expected - trainable)
        raise RuntimeError(
            f"trainable parameters differ from the patch embedding: extra={extra} missing={missing}"
        )


@dataclass(frozen=True)
class ParamRow:
    component: str
    total: int
    trainable: int
    note: str = ""


def _numel(p: torch.Tensor) -> int:
    # ZeRO-3 partitioned parameters are empty locally; ds_numel is the full size.
    return int(getattr(p, "ds_numel", p.numel()))


def parameter_table(model: nn.Module) -> tuple[list[ParamRow], str]:
    """Total/trainable counts per component, each parameter counted once (tied ones in the first
    component that owns them), plus a formatted table for the log."""
    components: list[tuple[str, nn.Module]] = [
        ("patch embedding", find_patch_embed(model)),
        ("vision encoder", vision_tower(model)),
        ("projector", projector(model)),
        ("language model", _base(model).language_model),
        ("lm head", lm_head(model)),
    ]
    seen: set[int] = set()
    rows: list[ParamRow] = []
    for name, module in components:
        total = trainable = 0
        tied = False
        for p in module.parameters():
            if id(p) in seen:
                tied = True
                continue
            seen.add(id(p))
            total += _numel(p)
            trainable += _numel(p) if p.requires_grad else 0
        rows.append(
            ParamRow(
                name, total, trainable, "tied to an earlier component" if tied and not total else ""
            )
        )
    rest = [p for p in model.parameters() if id(p) not in seen]
    if rest:
        rows.append(
            ParamRow(
                "other", sum(map(_numel, rest)), sum(_numel(p) for p in rest if p.requires_grad)
            )
        )
    grand = ParamRow("total", sum(r.total for r in rows), sum(r.trainable for r in rows))
    lines = [f"{'component':<16} {'total':>15} {'trainable':>13} {'frozen':>15}"]
    for r in [*rows, grand]:
        lines.append(
            f"{r.component:<16} {r.total:>15,} {r.trainable:>13,} {r.total - r.trainable:>15,}"
            + (f"  ({r.note})" if r.note else "")
        )
    return [*rows, grand], "\n".join(lines)


# --- activation checkpointing ---------------------------------------------------------------
def enable_activation_checkpointing(model: nn.Module, vision: bool, language: bool) -> None:
    """Non-reentrant checkpointing per tower (on where memory needs it, off where it only costs).

    Non-reentrant checkpointing keeps the autograd graph through frozen layers, so gradients
    reach the patch embedding without forcing inputs to require grad. Like HF, it acts only in
    train() mode.
    """
    for module, on in ((vision_tower(model), vision), (language_model(model), language)):
        if not isinstance(module, PreTrainedModel):
            raise TypeError(
                f"{type(module).__name__} is not a PreTrainedModel: cannot set checkpointing"
            )
        if on:
            module.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
        elif getattr(module, "is_activation_checkpointing", False):
            module.activation_checkpointing_disable()


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Every encoder layer of the vision tower and decoder layer of the language model: the units
    regional compilation compiles (train/compile.py) and ZeRO-3 treats as leaf modules there."""
    return [
        m for m in model.modules() if type(m).__name__.endswith(("EncoderLayer", "DecoderLayer"))
    ]


# --- forward pieces -------------------------------------------------------------------------
def _tower_features(model: nn.Module, modality: str, pixel_values: torch.Tensor) -> torch.Tensor:
    """One modality's images -> projected features (N, L, H_text), as LlavaModel.get_image_features.

    The tower runs unmodified (patch embed -> CLIP pre_layrnorm -> encoder); the hidden state
    at `vision_feature_layer` is taken (index 0 = embedding output, -1 = last layer before
    post-layernorm), several layers are concatenated, then the projector maps to text width.
    """
    cfg = model.config
    layer = cfg.vision_feature_layer
    patch = find_patch_embed(model)
    with patch.use_modality(modality):
        # output_hidden_states=True, not =layer: layer 0 (the embedding output) is falsy.
        out = vision_tower(model)(pixel_values, output_hidden_states=True, return_dict=True)
    if isinstance(layer, int):
        selected = out.hidden_states[layer]
    else:
        selected = torch.cat([out.hidden_states[i] for i in layer], dim=-1)
    if cfg.vision_feature_select_strategy != "full":
        raise ValueError(
            "vision_feature_select_strategy must be 'full' with the MRI patch embedding "
            f"(got {cfg.vision_feature_select_strategy!r}); splice_patch_embed sets it"
        )
    return projector(model)(selected)


def branch_order(
    model: nn.Module, present: Sequence[str], required: Sequence[str] = ()
) -> list[str]:
    """The modality branches a forward runs, in the patch embedding's configured order.

    The order never depends on the batch: ZeRO-3 gathers a branch's parameters when it runs, so
    two ranks running branches in different orders would gather different parameters at the same
    collective (a size-mismatch abort on gloo, a hang on NCCL), and ZeRO-1/2 fill gradient buckets
    in hook order, so they would reduce one rank's T1 gradients into another's rsfMRI ones with no
    error at all. `present` are the modalities with images in this batch; `required` are those
    that must run anyway (with a zero dummy image) so every rank runs the same branches.
    """
    configured = find_patch_embed(model).modalities
    unknown = sorted(set(present) - set(configured)) + sorted(set(required) - set(configured))
    if unknown:
        raise ValueError(
            f"modalities {unknown} are not configured in the patch embedding ({configured})"
        )
    wanted = set(present) | set(required)
    return [m for m in configured if m in wanted]


def image_features(model: nn.Module, images: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{modality: (N_m, *size)} -> {modality: (N_m, L_m, H_text)}; empty modalities are skipped.

    Branches run in the configured order (`branch_order`), whatever order `images` has."""
    present = [m for m, x in images.items() if x.shape[0] > 0]
    return {m: _tower_features(model, m, images[m]) for m in branch_order(model, present)}


def _dummy_term(model: nn.Module, modality: str, like: torch.Tensor) -> torch.Tensor:
    """0 * features of a zero image: runs the branch (ZeRO-3 gathers stay in step) adding nothing."""
    spec = find_patch_embed(model).specs[modality]
    zeros = torch.zeros((1, *spec.size), device=like.device, dtype=like.dtype)
    return _tower_features(model, modality, zeros).sum() * 0.0


def check_image_tokens(
    input_ids: torch.Tensor,
    image_positions: Mapping[str, torch.Tensor],
    image_token_id: int,
) -> None:
    """Host-side check that each sample's `<image>` tokens are exactly the positions filled, for
    a batch built by hand (a synthetic probe, a test): raises ValueError naming the sample index
    and both counts.

    A batch built from data needs no second check: the collate (`data.collate.group_images`,
    which training, evaluation and ``umbrella-infer`` all build their batches with) finds every
    image's block among the sample's `<image>` tokens and refuses a sample whose tokens are not
    exactly its images' blocks, naming its task, on the host and so on every device.
    """
    ids = input_ids.detach().to("cpu")
    b, s = ids.shape
    tokens_per_sample = (ids == image_token_id).sum(dim=1)
    flat = [p.detach().to("cpu").reshape(-1) for p in image_positions.values() if p.numel()]
    positions = torch.cat(flat) if flat else torch.zeros(0, dtype=torch.long)
    if positions.numel() and (positions.min() < 0 or positions.max() >= b * s):
        raise ValueError(f"image positions out of range for a batch of shape ({b}, {s})")
    features_per_sample = (
        torch.bincount(positions // s, minlength=b)
        if positions.numel()
        else torch.zeros(b, dtype=torch.long)
    )
    for i in range(b):
        if int(tokens_per_sample[i]) != int(features_per_sample[i]):
            raise ValueError(
                f"sample {i}: {int(tokens_per_sample[i])} <image> tokens but "
                f"{int(features_per_sample[i])} image features destined for it"
            )
    if positions.numel():
        if positions.unique().numel() != positions.numel():
            raise ValueError("image positions contain duplicates")
        not_image = ids.reshape(-1)[positions] != image_token_id
        if bool(not_image.any()):
            bad = int(positions[not_image][0])
            raise ValueError(
                f"sample {bad // s}: image position {bad % s} does not hold an <image> token"
            )


def embed_inputs(
    model: nn.Module,
    input_ids: torch.Tensor,
    images: Mapping[str, torch.Tensor],
    image_positions: Mapping[str, torch.Tensor],
    all_modalities: Sequence[str] = (),
) -> torch.Tensor:
    """Token embeddings with each image's features copied onto its own `<image>` block.

    `image_positions[m]` holds flat indices into the (B*S) view, image after image, L_m each.
    Modalities in `all_modalities` missing from `images` still run a zero image through their
    branch, contributing exactly 0. Every branch, real or dummy, runs in the patch embedding's
    configured order (`branch_order`): never reordered by what the batch holds, on every rank.
    The positions are trusted to be the `<image>` blocks (the collate checked them; a batch built
    by hand: `check_image_tokens`).
    """
    embeds = model.get_input_embeddings()(input_ids)  # (B, S, H)
    b, s, h = embeds.shape
    flat = embeds.reshape(b * s, h)
    present = [m for m, x in images.items() if x.shape[0] > 0]
    for m, pos in image_positions.items():
        if m not in present and pos.numel():
            raise ValueError(f"image_positions[{m!r}] has {pos.numel()} entries but no {m} images")
    for m in branch_order(model, present, all_modalities):
        if m not in present:
            flat = flat + _dummy_term(model, m, flat)
            continue
        if m not in image_positions:
            raise ValueError(f"images of modality {m!r} given without image_positions[{m!r}]")
        f = _tower_features(model, m, images[m])
        pos = image_positions[m].to(flat.device, non_blocking=True).reshape(-1)
        rows = f.reshape(-1, h)
        if pos.numel() != rows.shape[0]:
            raise ValueError(
                f"{m}: {pos.numel()} image positions but {rows.shape[0]} feature rows "
                f"({f.shape[0]} images x {f.shape[1]} tokens)"
            )
        flat = flat.index_copy(0, pos, rows.to(flat.dtype))
    return flat.reshape(b, s, h)


def model_forward_loss(
    model: nn.Module,
    batch: Mapping[str, object],
    normaliser: float | torch.Tensor,
    all_modalities: Sequence[str] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """sum of token cross-entropies at supervised positions / normaliser, and the detached sum.

    The LM runs to its last hidden states (`use_cache=False`); `lm_head` sees only the K rows
    at `batch["loss_positions"]`, and the CE is computed in fp32.
    """
    input_ids = batch["input_ids"]
    embeds = embed_inputs(
        model,
        input_ids,
        batch["images"],
        batch["image_positions"],
        all_modalities,  # type: ignore[arg-type]
    )
    out = language_model(model)(
        inputs_embeds=embeds, attention_mask=batch["attention_mask"], use_cache=False
    )
    hidden = out.last_hidden_state
    b, s, h = hidden.shape
    positions = batch["loss_positions"].to(hidden.device, non_blocking=True)  # type: ignore[union-attr]
    targets = batch["loss_targets"].to(hidden.device, non_blocking=True)  # type: ignore[union-attr]
    logits = lm_head(model)(hidden.reshape(b * s, h).index_select(0, positions))
    loss_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
    return loss_sum / normaliser, loss_sum.detach()


# --- generation -----------------------------------------------------------------------------
@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    images: Mapping[str, torch.Tensor],
    image_positions: Mapping[str, torch.Tensor],
    max_new_tokens: int,
    eos_token_id: int,
    *,
    all_modalities: Sequence[str] = (),
    return_first_step_logits: bool = False,
) -> list[list[int]] | tuple[list[list[int]], torch.Tensor]:
    """Greedy decoding of LEFT-padded prompts with a KV cache.

    Always runs exactly `max_new_tokens` LM forwards (prefill + max_new_tokens - 1 decode
    steps), whatever finishes early, so ZeRO-3 ranks stay in lockstep. Positions come from the
    attention mask (pads do not advance them). Returns per sample the generated ids up to and
    excluding the first `eos_token_id`; with `return_first_step_logits` also the first step's
    full logits (B, V) in float32 (for scoring candidate answers, e.g. AUROC).
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError(
            "greedy_generate expects left-padded prompts (last column all real tokens)"
        )
    lm, head = language_model(model), lm_head(model)
    embeds = embed_inputs(model, input_ids, images, image_positions, all_modalities)
    mask = attention_mask.to(embeds.device).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=lm.config)
    out = lm(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
    )
    first_logits = head(out.last_hidden_state[:, -1]).float()
    from umbrella_ds.model.generate import decode_greedy  # the one decode loop (late: a cycle)

    result, _ = decode_greedy(
        model, out.cache, mask, positions[:, -1:], first_logits, max_new_tokens, eos_token_id
    )
    if return_first_step_logits:
        return result, first_logits
    return result
