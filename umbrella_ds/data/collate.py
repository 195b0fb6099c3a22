"""Batches: dynamic padding, images grouped by modality, every index tensor built on the host.

Flat positions index the (B*S) view of the batch: position b*S + s. The model scatters image
features to `image_positions[m]` (image n of modality m owns entries n*L_m .. (n+1)*L_m - 1, in
the order samples and their images come) and computes logits only at `loss_positions`, so the
device never does boolean masking (a host sync per step).

Modalities absent from a batch are absent from `images` / `image_positions`; the engine supplies
any dummy input ZeRO-3 needs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from umbrella_ds import modality as modality_table

from .render import IGNORE_INDEX


def _image_blocks(
    ids: np.ndarray,
    modalities: Sequence[str],
    image_token_id: int,
    tokens_per_image: Mapping[str, int],
    task_id: str,
) -> list[np.ndarray]:
    """Positions (within the sample) of each image's token block, checked against its images:
    the one check of the image-token blocks of a batch built from data (the model trusts them)."""
    pos = np.flatnonzero(ids == image_token_id)
    try:
        lengths = [int(tokens_per_image[m]) for m in modalities]
    except KeyError as err:
        raise ValueError(
            f"sample {task_id!r}: modality {err.args[0]!r} has no image token count "
            f"(configured: {sorted(tokens_per_image)})"
        ) from None
    if pos.size != sum(lengths):
        raise ValueError(
            f"sample {task_id!r}: {pos.size} image tokens but {len(lengths)} image(s) of "
            f"{list(modalities)} need {sum(lengths)}"
        )
    blocks, k = [], 0
    for n, length in enumerate(lengths):
        block = pos[k : k + length]
        if block[-1] - block[0] != length - 1:
            raise ValueError(
                f"sample {task_id!r}: image {n} ({modalities[n]}) does not own a contiguous block "
                f"of {length} image tokens"
            )
        blocks.append(block)
        k += length
    return blocks


def stack_images(arrays: Sequence[np.ndarray], *, series: bool) -> torch.Tensor:
    """One (N, *shape) tensor from same-shaped arrays, written once, in the layout they are stored.

    The items' images are views (flipped, time axis moved), and this is their one copy:
    - In a DataLoader worker the batch is allocated in shared memory (as PyTorch's
      default_collate does), since sending it to the training process would otherwise copy
      every tensor not already there into a new segment.
    - Series (4-d: the reader's (D, H, W, T), a view of frames stored time-first) are written
      time-first, (N, T, D, H, W), and returned as the (N, D, H, W, T) view the model takes: a
      flipped window costs a reversed copy, not a transpose of 42 MB (which making flipped items
      contiguous used to cost). The view travels as it is (shared memory, pinning and the copy
      to the GPU keep strides), and the patch embedding's block gather reads it on the device.
    Measured against the previous path, one worker at the GPU shapes: 1.8-1.9x (docs/BENCHMARKS.md).
    ``series``: the modality's `Modality.is_series` (the table decides, not the array's shape).
    """
    first = arrays[0]
    if first.ndim != (4 if series else 3):
        kind = "series (D, H, W, T)" if series else "volume (D, H, W)"
        raise ValueError(f"a {kind} batch got an image of shape {first.shape}")
    if series:
        arrays = [np.moveaxis(a, -1, 0) for a in arrays]
        first = arrays[0]
    shape = (len(arrays), *first.shape)
    proto = torch.from_numpy(np.empty(0, dtype=first.dtype))
    if torch.utils.data.get_worker_info() is not None:
        storage = proto._typed_storage()._new_shared(math.prod(shape))
        out = proto.new(storage).view(shape)
    else:
        out = proto.new_empty(shape)
    np.stack(arrays, out=out.numpy())
    return out.movedim(1, -1) if series else out


def _materialised(image: Any) -> np.ndarray:
    """An item's image as an array (a deferred `dataset.ImageRead` is read here)."""
    return image if isinstance(image, np.ndarray) else image.read()


def write_images(images: Sequence[Any], out: torch.Tensor, *, series: bool) -> torch.Tensor:
    """Images written once each into ``out`` (a reused batch slot in the stored layout: (N, D, H,
    W), or (N, T, D, H, W) for a series, ``series`` being the modality's `Modality.is_series`);
    returns the batch's view, as `stack_images` would.

    A deferred image (`dataset.ImageRead`) is read and decoded straight into its place; an array
    (an item read before) is copied there. Nothing else is allocated."""
    if len(images) > out.shape[0]:
        raise ValueError(f"{len(images)} images but the batch slot holds {out.shape[0]}")
    dest = out.numpy()
    for n, image in enumerate(images):
        if isinstance(image, np.ndarray):
            src = np.moveaxis(image, -1, 0) if series else image
            if src.shape != dest.shape[1:]:
                raise ValueError(f"image of shape {image.shape} for a slot of {tuple(out.shape)}")
            np.copyto(dest[n], src)
        else:
            image.read_into(dest[n])
    batch = out[: len(images)]
    return batch.movedim(1, -1) if series else batch


def group_images(
    samples: Sequence[Mapping[str, Any]],
    offsets: Sequence[np.ndarray],
    image_token_id: int,
    tokens_per_image: Mapping[str, int],
    ids_key: str,
    out: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """offsets[b] maps a sample's local position to its flat position in the batch; ``out``: a
    batch slot per modality the images are written into (`write_images`), else new tensors."""
    arrays: dict[str, list[np.ndarray]] = {}
    positions: dict[str, list[np.ndarray]] = {}
    for b, sample in enumerate(samples):
        mods = [m for m, _ in sample["images"]]
        blocks = _image_blocks(
            np.asarray(sample[ids_key]), mods, image_token_id, tokens_per_image, sample["task_id"]
        )
        for (mod, arr), block in zip(sample["images"], blocks):
            arrays.setdefault(mod, []).append(arr)
            positions.setdefault(mod, []).append(block + offsets[b])
    images = {}
    for mod, arrs in arrays.items():
        series = modality_table.get(mod).is_series
        if out is not None:
            images[mod] = write_images(arrs, out[mod], series=series)
            continue
        arrs = [_materialised(a) for a in arrs]
        shapes = {a.shape for a in arrs}
        if len(shapes) != 1:
            raise ValueError(f"images of modality {mod!r} in one batch differ in shape: {shapes}")
        images[mod] = stack_images(arrs, series=series)
    image_positions = {
        mod: torch.from_numpy(np.concatenate(p).astype(np.int64)) for mod, p in positions.items()
    }
    return images, image_positions


def collate_train(
    samples: Sequence[Mapping[str, Any]],
    *,
    pad_id: int,
    image_token_id: int,
    tokens_per_image: Mapping[str, int],
    out: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Right-pad to the longest sample; see the module docstring for the index tensors.

    ``out``: a batch slot per modality (`slots.SlotPool`) the images are written into."""
    if not samples:
        raise ValueError("collate_train got an empty batch")
    lengths = [len(s["input_ids"]) for s in samples]
    bsz, seq = len(samples), max(lengths)
    input_ids = np.full((bsz, seq), pad_id, dtype=np.int64)
    labels = np.full((bsz, seq), IGNORE_INDEX, dtype=np.int64)
    attention = np.zeros((bsz, seq), dtype=np.int64)
    for b, s in enumerate(samples):
        n = lengths[b]
        if len(s["labels"]) != n:
            raise ValueError(
                f"sample {s['task_id']!r}: {n} input ids but {len(s['labels'])} labels"
            )
        input_ids[b, :n] = s["input_ids"]
        labels[b, :n] = s["labels"]
        attention[b, :n] = 1
    # Position t predicts token t+1 of the same row.
    rows, cols = np.nonzero(labels[:, 1:] != IGNORE_INDEX)
    loss_positions = rows * seq + cols
    loss_targets = labels[rows, cols + 1]
    offsets = [np.int64(b * seq) for b in range(bsz)]
    images, image_positions = group_images(
        samples, offsets, image_token_id, tokens_per_image, "input_ids", out
    )
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention),
        "labels": torch.from_numpy(labels),
        "images": images,
        "image_positions": image_positions,
        "loss_positions": torch.from_numpy(loss_positions.astype(np.int64)),
        "loss_targets": torch.from_numpy(loss_targets.astype(np.int64)),
        "num_loss_tokens": int(loss_positions.size),
        "num_tokens": int(sum(lengths)),
        "task_ids": [s["task_id"] for s in samples],
    }


def collate_eval(
    samples: Sequence[Mapping[str, Any]],
    *,
    pad_id: int,
    image_token_id: int,
    tokens_per_image: Mapping[str, int],
) -> dict[str, Any]:
    """Left-pad prompts (generation continues from the right edge); positions after padding."""
    if not samples:
        raise ValueError("collate_eval got an empty batch")
    for s in samples:
        if "prompt_ids" not in s:
            raise ValueError(
                f"sample {s['task_id']!r} has no prompt_ids: build the dataset with train=False"
            )
    lengths = [len(s["prompt_ids"]) for s in samples]
    bsz, seq = len(samples), max(lengths)
    prompt_ids = np.full((bsz, seq), pad_id, dtype=np.int64)
    attention = np.zeros((bsz, seq), dtype=np.int64)
    offsets = []
    for b, s in enumerate(samples):
        pad = seq - lengths[b]
        prompt_ids[b, pad:] = s["prompt_ids"]
        attention[b, pad:] = 1
        offsets.append(np.int64(b * seq + pad))
    images, image_positions = group_images(
        samples, offsets, image_token_id, tokens_per_image, "prompt_ids"
    )
    return {
        "prompt_ids": torch.from_numpy(prompt_ids),
        "attention_mask": torch.from_numpy(attention),
        "images": images,
        "image_positions": image_positions,
        "target_texts": [s["target_text"] for s in samples],
        "task_ids": [s["task_id"] for s in samples],
        "subject_ids": [s["subject_ids"] for s in samples],
        "metadata": [s["metadata"] for s in samples],
        "window_start": [s["window_start"] for s in samples],
    }


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A batch of this module to ``device``: tensors, also inside the per-modality dicts, copied
    without blocking (pinned host memory); host-side lists stay. The only copy of this walk."""
    if device.type == "cpu":
        return batch

    def move(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.to(device, non_blocking=True)
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        return v

    return {k: move(v) for k, v in batch.items()}
