"""Evaluation batches, built in DataLoader workers: whole conversations aligned at the prompt end.

Each rank's evaluation is a fixed list of planned batches (``Planned``: a task and the eval-set
indices of its items; a dummy batch, which keeps ZeRO-3 ranks in lockstep, repeats the task's
first item and its results are dropped). ``EvalBatches`` serves batch j of that list as one
dataset item, so the training loader's construction (``data.loader.build_loader``: workers,
pinned memory, prefetch) reads and collates evaluation batches too, with batch size 1.

``collate_joint`` lays a batch out for ``model.generate.prefill_with_loss``: each row is the
sample's rendered conversation (prompt + reference answer, the training ids and labels) placed so
that every prompt ends at the same column P, left-padded before and right-padded after. Candidate
answers for the likelihood choice travel with the batch as right-padded id tensors per class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from umbrella_ds.data.collate import group_images
from umbrella_ds.data.render import IGNORE_INDEX


@dataclass(frozen=True)
class Planned:
    task: str
    indices: tuple[int, ...]  # eval-set indices, in order
    dummy: bool = False
    # class -> per item the candidate answer's token ids (likelihood tasks only)
    candidates: Mapping[str, tuple[tuple[int, ...], ...]] = field(default_factory=dict)


def collate_joint(
    samples: Sequence[Mapping[str, Any]],
    *,
    pad_id: int,
    image_token_id: int,
    tokens_per_image: Mapping[str, int],
) -> dict[str, Any]:
    """Rows = conversations aligned at the prompt end (module docstring); host-built indices."""
    if not samples:
        raise ValueError("collate_joint got an empty batch")
    prompts = [len(s["prompt_ids"]) for s in samples]
    for s, n in zip(samples, prompts):
        if not np.array_equal(np.asarray(s["input_ids"][:n]), np.asarray(s["prompt_ids"])):
            raise ValueError(
                f"sample {s['task_id']!r}: the evaluation prompt is not a prefix of the rendered "
                "conversation (template and renderer disagree)"
            )
    p = max(prompts)
    tails = [len(s["input_ids"]) - n for s, n in zip(samples, prompts)]
    bsz, seq = len(samples), p + max(tails)
    input_ids = np.full((bsz, seq), pad_id, dtype=np.int64)
    labels = np.full((bsz, seq), IGNORE_INDEX, dtype=np.int64)
    attention = np.zeros((bsz, seq), dtype=np.int64)
    offsets = []
    for b, s in enumerate(samples):
        start = p - prompts[b]
        end = start + len(s["input_ids"])
        input_ids[b, start:end] = s["input_ids"]
        labels[b, start:end] = s["labels"]
        attention[b, start:end] = 1
        offsets.append(np.int64(b * seq + start))
    # Position t predicts token t+1 of the same row.
    rows, cols = np.nonzero(labels[:, 1:] != IGNORE_INDEX)
    images, image_positions = group_images(
        samples, offsets, image_token_id, tokens_per_image, "input_ids"
    )
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention),
        "images": images,
        "image_positions": image_positions,
        "loss_positions": torch.from_numpy((rows * seq + cols).astype(np.int64)),
        "loss_targets": torch.from_numpy(labels[rows, cols + 1].astype(np.int64)),
        "num_loss_tokens": int(rows.size),
        "prompt_end": p,
    }


def pad_candidates(
    candidates: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), each (B, T): one candidate answer per row, right-padded."""
    t = max(len(c) for c in candidates)
    ids = np.full((len(candidates), t), pad_id, dtype=np.int64)
    mask = np.zeros((len(candidates), t), dtype=np.int64)
    for b, c in enumerate(candidates):
        if not c:
            raise ValueError("a candidate answer has no tokens")
        ids[b, : len(c)] = c
        mask[b, : len(c)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


class EvalBatches(torch.utils.data.Dataset):
    """Item j = planned batch j, read and collated (in a DataLoader worker when there are any)."""

    def __init__(self, dataset, plan: Sequence[Planned], collate_kw: Mapping[str, Any]) -> None:
        self.dataset = dataset
        self.plan = list(plan)
        self.collate_kw = dict(collate_kw)

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, j: int) -> dict[str, Any]:
        planned = self.plan[j]
        items = [self.dataset[(0, i)] for i in planned.indices]
        batch = collate_joint(items, **self.collate_kw)
        batch["candidates"] = {
            c: pad_candidates(ids, self.collate_kw["pad_id"])
            for c, ids in planned.candidates.items()
        }
        batch["items"] = [
            {
                "task_id": it["task_id"],
                "subject_ids": it["subject_ids"],
                "metadata": it["metadata"],
                "window_start": it["window_start"],
                "target_text": it["target_text"],
            }
            for it in items
        ]
        return batch


def unwrap(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """The loader's collate_fn: items are whole batches already (batch size 1)."""
    return batch[0]
