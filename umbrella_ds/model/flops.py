"""FLOPs per step of the patched LLaVA, from its structure: what MFU and HFU divide by.

Only the patch embedding trains, so frozen weights need no weight gradients:
the backward pass costs activation gradients only, and only where the gradient passes. With

  T_img  image tokens into the vision tower       T  non-pad tokens into the language model
  K      supervised positions                     H  text hidden size,  V  vocabulary
  N_vf   vision parameters a token passes forward: every encoder layer that runs, the
         projector, and (SigLIP pooling head, if the tower has one) its key/value projections
  N_vb   vision parameters the gradient passes back through: encoder layers up to the selected
         ``vision_feature_layer``, and the projector
  N_l    decoder-layer parameters (token embedding, final norm and LM head excluded)

    forward    2 (N_vf T_img + N_l T + H V K)        (the LM head only at the K positions)
    backward   2 (N_vb T_img + N_l T + H V K)        activation gradients only
    useful     forward + backward                    -> mfu

Left out: attention-score FLOPs (short sequences), norms/activations, and the patch embedding
itself (< 2% of the vision tower). Recomputation under activation checkpointing is not useful
work: another forward of the checkpointed layers the gradient passes,
2 (N_vb_layers T_img [vision on] + N_l T [language on]), is added for ``hfu`` (hardware FLOPs
utilisation), reported beside ``mfu`` when checkpointing is on.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from umbrella_ds.model.llava import language_model, lm_head, projector, vision_tower


@dataclass(frozen=True)
class FlopCounter:
    """Per-step FLOPs from the counts the collate already has (see the module docstring).

    ``vision_forward`` = N_vf, ``vision_backward`` = N_vb, ``language`` = N_l;
    ``vision_recompute`` / ``language_recompute``: parameters of the checkpointed layers replayed
    in backward (0 where that tower's checkpointing is off).
    """

    vision_forward: int
    vision_backward: int
    language: int
    hidden: int
    vocab: int
    vision_recompute: int = 0
    language_recompute: int = 0

    def forward(self, image_tokens: int, tokens: int, loss_tokens: int) -> float:
        return 2.0 * (
            self.vision_forward * image_tokens
            + self.language * tokens
            + self.hidden * self.vocab * loss_tokens
        )

    def backward(self, image_tokens: int, tokens: int, loss_tokens: int) -> float:
        return 2.0 * (
            self.vision_backward * image_tokens
            + self.language * tokens
            + self.hidden * self.vocab * loss_tokens
        )

    def useful(self, image_tokens: int, tokens: int, loss_tokens: int) -> float:
        return self.forward(image_tokens, tokens, loss_tokens) + self.backward(
            image_tokens, tokens, loss_tokens
        )

    @property
    def recomputes(self) -> bool:
        return bool(self.vision_recompute or self.language_recompute)

    def recomputed(self, image_tokens: int, tokens: int) -> float:
        return 2.0 * (self.vision_recompute * image_tokens + self.language_recompute * tokens)


def _numel(module: nn.Module) -> int:
    # ZeRO-3 partitioned parameters are empty locally; ds_numel is the full size.
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


def _feature_layers(layer: int | list[int], num_layers: int) -> int:
    """Encoder layers the selected hidden state depends on (hidden_states[0] = embeddings)."""
    idx = [layer] if isinstance(layer, int) else list(layer)
    return max(i if i >= 0 else num_layers + 1 + i for i in idx)


def flop_counter(model: nn.Module, checkpointing: tuple[bool, bool]) -> FlopCounter:
    """The FLOP formula's parameter counts, read from the built model (see the module docstring)."""
    tower = vision_tower(model)
    vt = getattr(tower, "vision_model", tower)
    layers = list(vt.encoder.layers)
    per_layer = [_numel(m) for m in layers]
    grad_layers = sum(per_layer[: _feature_layers(model.config.vision_feature_layer, len(layers))])
    proj = _numel(projector(model))
    head = getattr(vt, "head", None)  # SigLIP pooling head: runs forward, gets no gradient
    head_kv = 0
    if head is not None:
        h_v = int(vt.config.hidden_size)
        head_kv = 2 * h_v * h_v  # key/value projections of every token (the query is one probe)
    lm = language_model(model)
    n_lang = sum(_numel(m) for m in lm.layers)
    weight = lm_head(model).weight
    vocab, hidden = (int(x) for x in getattr(weight, "ds_shape", weight.shape))
    vision_ck, language_ck = checkpointing
    return FlopCounter(
        vision_forward=sum(per_layer) + proj + head_kv,
        vision_backward=grad_layers + proj,
        language=n_lang,
        hidden=hidden,
        vocab=vocab,
        vision_recompute=grad_layers if vision_ck else 0,
        language_recompute=n_lang if language_ck else 0,
    )
