"""DataLoader construction: worker processes, pinned memory, prefetch, persistent workers.

All randomness of an item is derived from (seed, epoch, index) inside the dataset, so workers
seed nothing that could change outputs: a loader with 2 workers yields the same batches as one
with none. Shards opened from a path are opened inside each worker after the fork.
"""

from __future__ import annotations

import contextlib
import re
import signal
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .dataset import DeferredImages
from .slots import SlotCollate, SlotPool, resolve


class LoaderWorkerError(RuntimeError):
    """A loader worker process died."""


def _one_thread_per_worker(worker_id: int) -> None:
    # One intra-op thread per worker: workers are processes already, extra threads only contend.
    torch.set_num_threads(1)


class _Release:
    """A batch's slot back to its worker, once."""

    def __init__(self, pool: SlotPool, worker: int, slot: int) -> None:
        self.pool, self.worker, self.slot, self.done = pool, worker, slot, False

    def __call__(self, copied: Any = None) -> None:
        if not self.done:
            self.done = True
            self.pool.release(self.worker, self.slot, copied)


class SlotLoader:
    """A DataLoader whose workers write images into reused batch slots (`slots.SlotPool`).

    Iterating yields batches whose images are views of the slots; each must be given back with
    `slots.release(batch, copied)` once nothing reads it. A worker that dies is reported by its
    number (PyTorch names only its pid)."""

    def __init__(self, loader: DataLoader, pool: SlotPool) -> None:
        self.loader, self.pool = loader, pool
        self.sampler = loader.sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.pool.settle()  # a new iterator hands workers new tasks at once
        it = iter(self.loader)
        _name_dead_workers(it)
        while True:
            self.pool.settle()
            try:
                batch = next(it)
            except StopIteration:
                return
            except RuntimeError as err:
                raise _named(it, err) from err
            batch = resolve(batch, self.pool)
            w, s = batch["slot"]
            batch["release"] = _Release(self.pool, w, s)
            yield batch


_WORKER_NUMBERS: dict[int, int] = {}  # pid -> worker number, of the live slot loaders' workers


def _name_dead_workers(it: Any) -> None:
    """PyTorch reports a worker killed by a signal from its SIGCHLD handler, wherever the
    training process is, by pid; wrap that handler (once) to add the worker's number."""
    for i, w in enumerate(getattr(it, "_workers", [])):
        _WORKER_NUMBERS[int(w.pid)] = i
    prev = signal.getsignal(signal.SIGCHLD)
    if not callable(prev) or getattr(prev, "_names_workers", False):
        return

    def handler(signum: int, frame: Any) -> None:
        try:
            prev(signum, frame)
        except RuntimeError as err:
            pid = re.search(r"pid\(?s?\)? (\d+)", str(err))
            number = _WORKER_NUMBERS.get(int(pid.group(1))) if pid else None
            if number is None:
                raise
            raise LoaderWorkerError(
                f"loader worker {number} (pid {pid.group(1)}) died: {err}"  # type: ignore[union-attr]
            ) from err

    handler._names_workers = True  # type: ignore[attr-defined]
    with contextlib.suppress(ValueError):  # not the main thread: PyTorch's message stays
        signal.signal(signal.SIGCHLD, handler)


def _named(it: Any, err: RuntimeError) -> RuntimeError:
    """PyTorch's error for a dead worker, with the worker's number."""
    dead = [(i, w) for i, w in enumerate(getattr(it, "_workers", [])) if not w.is_alive()]
    if not dead:
        return err
    i, w = dead[0]
    how = f"killed by signal {-w.exitcode}" if (w.exitcode or 0) < 0 else f"exit code {w.exitcode}"
    return LoaderWorkerError(f"loader worker {i} (pid {w.pid}) died ({how}): {err}")


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
    pool: SlotPool | None = None,
) -> DataLoader | SlotLoader:
    """A DataLoader over `sampler` (which yields (epoch, index) keys) in micro-batches.

    pin_memory applies only when CUDA is available; prefetch_factor and persistent_workers only
    with worker processes. The sampler decides the epoch's length (drop-last across the global
    batch), so the loader itself drops nothing. With a slot ``pool`` (worker processes only) the
    images are decoded straight into reused shared-memory slots: a `SlotLoader`, whose batches
    must be released (`slots.release`); the slots are page-locked instead of each batch pinned.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    workers = num_workers > 0
    if pool is not None:
        if not workers or pool.num_workers != num_workers:
            raise ValueError(
                f"a pool of {pool.num_workers} workers' slots for {num_workers} workers"
            )
        dataset = DeferredImages(dataset)  # type: ignore[arg-type]
        collate_fn = SlotCollate(collate_fn, pool)
        if bool(pin_memory) and torch.cuda.is_available():
            pool.pin()
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=bool(pin_memory) and torch.cuda.is_available(),
        prefetch_factor=prefetch_factor if workers else None,
        persistent_workers=bool(persistent_workers) and workers,
        worker_init_fn=_one_thread_per_worker if workers else None,
        generator=torch.Generator().manual_seed(int(seed)),
        drop_last=False,
    )
    return loader if pool is None else SlotLoader(loader, pool)
