"""DataLoader construction: worker processes, pinned memory, prefetch, persistent workers.

All randomness of an item is derived from (seed, epoch, index) inside the dataset, so workers
seed nothing that could change outputs: a loader with 2 workers yields the same batches as one
with none. Shards opened from a path are opened inside each worker after the fork.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def _worker_init(worker_id: int) -> None:
    # One intra-op thread per worker: workers are processes already, extra threads only contend.
    torch.set_num_threads(1)


def build_loader(
    dataset: Dataset,
    sampler: Sampler,
    collate_fn: Callable[[list[Any]], Any],
    *,
    batch_size: int,
    num_workers: int,
    prefetch_factor: int | None = 2,
    pin_memory: bool = True,
    persistent_workers: bool = True,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader over `sampler` (which yields (epoch, index) keys) in micro-batches.

    pin_memory applies only when CUDA is available; prefetch_factor and persistent_workers only
    with worker processes. The sampler decides the epoch's length (drop-last across the global
    batch), so the loader itself drops nothing.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    workers = num_workers > 0
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=bool(pin_memory) and torch.cuda.is_available(),
        prefetch_factor=prefetch_factor if workers else None,
        persistent_workers=bool(persistent_workers) and workers,
        worker_init_fn=_worker_init if workers else None,
        generator=torch.Generator().manual_seed(int(seed)),
        drop_last=False,
    )
