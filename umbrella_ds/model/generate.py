"""Evaluation's forwards over one prompt cache: loss and prefill in one forward, greedy decoding,
and the summed log-likelihood of candidate answers under teacher forcing.

A batch for ``prefill_with_loss`` holds each sample's whole conversation (prompt + reference
answer), left-padded so that every prompt ends at the same column P (``prompt_end``) and
right-padded after the answer. One forward then gives:

- the teacher-forced loss at the supervised positions (the training loss of those samples);
- the first decoding step's logits (column P - 1, the last prompt token);
- the prompt's KV cache: the cache of the whole rows cropped to P columns, which is exactly the
  cache a prompt-only prefill would hold (attention is causal, so columns before P never saw
  the answer).

Decoding and the candidate forwards continue from that cache. Every function runs the same
number of language-model forwards whatever the batch holds (ZeRO-3 ranks stay in lockstep).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from umbrella_ds.model.llava import embed_inputs, language_model, lm_head


@dataclass
class Prefill:
    """The prompt's state after ``prefill_with_loss``: what decoding and scoring continue from."""

    cache: Any  # transformers Cache holding exactly the P prompt columns
    mask: torch.Tensor  # (B, P) attention mask of the prompt columns
    last_pos: torch.Tensor  # (B, 1) position id of each row's last prompt token
    first_logits: torch.Tensor  # (B, V) float32 logits of the first answer token
    loss_sum: torch.Tensor  # () float32 sum of token cross-entropies at the supervised positions


def _lm(model: nn.Module, embeds, mask, positions, cache):
    return language_model(model)(
        inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache,
        use_cache=True,
    )  # fmt: skip


def _crop(cache: Any, length: int) -> None:
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


@torch.no_grad()
def prefill_with_loss(
    model: nn.Module, batch: Mapping[str, Any], all_modalities: Sequence[str] = ()
) -> Prefill:
    """One forward over whole conversations aligned at ``batch["prompt_end"]`` (module doc)."""
    input_ids = batch["input_ids"]
    p = int(batch["prompt_end"])
    embeds = embed_inputs(
        model, input_ids, batch["images"], batch["image_positions"], all_modalities
    )
    mask = batch["attention_mask"].to(embeds.device).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    lm = language_model(model)
    out = _lm(model, embeds, mask, positions, DynamicCache(config=lm.config))
    hidden = out.last_hidden_state
    b, s, h = hidden.shape
    head = lm_head(model)
    loss_pos = batch["loss_positions"].to(hidden.device, non_blocking=True)
    targets = batch["loss_targets"].to(hidden.device, non_blocking=True)
    logits = head(hidden.reshape(b * s, h).index_select(0, loss_pos))
    loss_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
    first_logits = head(hidden[:, p - 1]).float()
    cache = out.cache
    _crop(cache, p)
    return Prefill(cache, mask[:, :p], positions[:, p - 1 : p], first_logits, loss_sum)


@torch.no_grad()
def continuation_logprobs(
    model: nn.Module, pre: Prefill, cand_ids: torch.Tensor, cand_mask: torch.Tensor
) -> torch.Tensor:
    """Summed log-likelihood (float64, (B,)) of each row's candidate answer after its prompt.

    ``cand_ids`` (B, T) are right-padded candidate answer tokens (``cand_mask`` 1 on real ones;
    every row has at least one). Token 0 is scored by the prefill's first logits, token t by the
    logits after tokens 0..t-1, as lm-evaluation-harness scores a multiple-choice continuation.
    One language-model forward; the cache is cropped back to the prompt afterwards.
    """
    device = pre.first_logits.device
    cand_ids = cand_ids.to(device)
    cand_mask = cand_mask.to(device).long()
    first = torch.log_softmax(pre.first_logits.double(), dim=-1)
    total = first.gather(1, cand_ids[:, :1]).squeeze(1)
    t = cand_ids.shape[1]
    mask = torch.cat([pre.mask, cand_mask], dim=1)
    positions = pre.last_pos + torch.arange(1, t + 1, device=device)[None, :]
    embed = model.get_input_embeddings()
    out = _lm(model, embed(cand_ids), mask, positions, pre.cache)
    # Called even when T == 1 (an empty slice): every rank calls lm_head alike (ZeRO-3).
    logits = lm_head(model)(out.last_hidden_state[:, :-1]).double()
    lp = torch.log_softmax(logits, dim=-1).gather(2, cand_ids[:, 1:, None]).squeeze(2)
    total = total + (lp * cand_mask[:, 1:]).sum(dim=1)
    _crop(pre.cache, pre.mask.shape[1])
    return total


@torch.no_grad()
def decode_greedy(
    model: nn.Module,
    cache: Any,
    mask: torch.Tensor,
    last_pos: torch.Tensor,
    logits: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int,
) -> tuple[list[list[int]], list[bool]]:
    """Greedy tokens from a prefilled cache and the first step's ``logits``.

    Always ``max_new_tokens - 1`` decode forwards, whatever finishes early (lockstep). Returns per
    row the tokens up to and excluding the first ``eos_token_id``, and whether the row was cut
    (no eos within ``max_new_tokens``).
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    embed, head = model.get_input_embeddings(), lm_head(model)
    b = mask.shape[0]
    done = torch.zeros(b, dtype=torch.bool, device=logits.device)
    generated: list[torch.Tensor] = []
    next_pos = last_pos
    for step in range(max_new_tokens):
        token = logits.argmax(dim=-1)
        token = torch.where(done, torch.full_like(token, eos_token_id), token)
        generated.append(token)
        done = done | (token == eos_token_id)
        if step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
        next_pos = next_pos + 1
        out = _lm(model, embed(token[:, None]), mask, next_pos, cache)
        cache = out.cache
        logits = head(out.last_hidden_state[:, -1]).float()
    tokens = torch.stack(generated, dim=1).tolist()
    rows = [row[: row.index(eos_token_id)] if eos_token_id in row else row for row in tokens]
    return rows, [eos_token_id not in row for row in tokens]
