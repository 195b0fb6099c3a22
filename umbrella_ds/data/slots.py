"""Batch slots: shared-memory image buffers per loader worker, allocated once and reused.

Why: a fresh batch in shared memory costs a first-touch page fault per 4 KiB (55% of a T1
batch's worker time, docs/BENCHMARKS.md). The pool allocates every slot in the training process
before the workers start and writes it once (prefault); a worker decodes a batch's images
straight into one of its own slots (`collate.write_images`) and sends only a `SlotRef`; the
training process maps the ref onto its own view of the same memory, so no image byte is copied
or faulted per batch.

A slot goes back to its worker only when nothing can still read it: the engine calls `release`
after the backward of its micro-batch (on the CPU, Conv3d keeps its input for backward) with, on
a GPU, an event recorded after the host-to-device copy, which the pool waits on before the slot
is free. One flag per slot in shared memory: the worker sets it to 0 when it claims the slot, the
training process back to 1 when it releases it (one writer each way, no lock).

Sizing (`slots_per_worker`): the engine fetches all ``gas`` micro-batches of a step before its
first forward and the DataLoader keeps ``prefetch_factor`` batches in flight per worker, handed
out round robin; a worker therefore holds at most ceil(gas / workers) + prefetch_factor batches,
and with that many slots it never waits. A worker that finds no free slot for `wait_s` seconds
(a batch never released) raises an error naming itself, instead of hanging the job.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from umbrella_ds import modality as modality_table

WAIT_S = 300.0  # longer than any step's hold of a slot; only a batch never released reaches it


class SlotTimeoutError(RuntimeError):
    """A loader worker found none of its batch slots released in time."""


@dataclass(frozen=True)
class SlotRef:
    """What a worker sends in place of a modality's images: slot ``slot`` of worker ``worker``,
    its first ``count`` images."""

    worker: int
    slot: int
    count: int


def slots_per_worker(gas: int, num_workers: int, prefetch_factor: int) -> int:
    """Slots one worker needs so that it never waits (module docstring)."""
    return -(-int(gas) // int(num_workers)) + int(prefetch_factor)


def image_layouts(
    tasks: Any, reader: Any, micro_batch: int, window: int
) -> dict[str, tuple[int, ...]]:
    """Per modality: a slot's (capacity, *stored shape) for micro-batches of these tasks.

    Capacity = micro_batch x the most images of that modality one task has; the stored shape is
    (D, H, W) for a volume and (T, D, H, W) for a series window, the order it is read in."""
    most: dict[str, int] = {}
    for task in tasks:
        counts: dict[str, int] = {}
        for im in task.images:
            counts[im.modality] = counts.get(im.modality, 0) + 1
        for m, c in counts.items():
            most[m] = max(most.get(m, 0), c)
    layouts = {}
    for m, c in most.items():
        shape = tuple(int(x) for x in reader.shape(m))
        if modality_table.get(m).is_series:
            shape = (int(window), *shape)
        layouts[m] = (int(micro_batch) * c, *shape)
    return layouts


class SlotPool:
    """``per_worker`` slots for each of ``num_workers`` workers; a slot holds one tensor per
    modality of ``layouts`` (float16, (capacity, *stored shape))."""

    def __init__(
        self,
        layouts: Mapping[str, tuple[int, ...]],
        num_workers: int,
        per_worker: int,
        wait_s: float = WAIT_S,
        dtype: torch.dtype = torch.float16,
    ) -> None:
        if num_workers < 1 or per_worker < 1:
            raise ValueError(
                f"a slot pool needs workers and slots, got {num_workers}, {per_worker}"
            )
        self.layouts = {m: tuple(s) for m, s in layouts.items()}
        self.num_workers, self.per_worker, self.wait_s = num_workers, per_worker, float(wait_s)
        self.buffers: list[list[dict[str, torch.Tensor]]] = [
            [
                {m: _shared(shape, dtype) for m, shape in self.layouts.items()}
                for _ in range(per_worker)
            ]
            for _ in range(num_workers)
        ]
        self.free = torch.ones((num_workers, per_worker), dtype=torch.int32).share_memory_()
        self._pending: list[tuple[Any, int, int]] = []  # (copy event, worker, slot)
        self._prefaulted = False

    @staticmethod
    def nbytes_for(
        layouts: Mapping[str, tuple[int, ...]], num_workers: int, per_worker: int
    ) -> int:
        per_slot = sum(math.prod(s) * 2 for s in layouts.values())  # float16
        return per_slot * num_workers * per_worker

    @property
    def nbytes(self) -> int:
        return self.nbytes_for(self.layouts, self.num_workers, self.per_worker)

    def __getstate__(self) -> dict[str, Any]:  # spawned workers: the shared tensors, no events
        state = dict(self.__dict__)
        state["_pending"] = []
        return state

    # -- worker side ------------------------------------------------------------------------
    def prefault(self, worker: int) -> None:
        """Touch this worker's slots once in its own process (its mapping faults here, once)."""
        if not self._prefaulted:
            for slot in self.buffers[worker]:
                for t in slot.values():
                    t.zero_()
            self._prefaulted = True

    def acquire(self, worker: int) -> int:
        """A free slot of ``worker``, claimed; waits for a release, at most ``wait_s``."""
        flags = self.free[worker].numpy()
        deadline, pause = time.monotonic() + self.wait_s, 1e-4
        while True:
            free = np.flatnonzero(flags)
            if free.size:
                s = int(free[0])
                flags[s] = 0
                return s
            if time.monotonic() > deadline:
                raise SlotTimeoutError(
                    f"loader worker {worker}: none of its {self.per_worker} batch slots was "
                    f"released by the training process in {self.wait_s:.0f} s (a batch never "
                    "released: every fetched batch must reach slots.release)"
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.01)

    def give_back(self, worker: int, slot: int) -> None:
        """A slot claimed but not sent (its collate failed)."""
        self.free[worker, slot] = 1

    # -- training-process side --------------------------------------------------------------
    def view(self, ref: SlotRef, modality: str) -> torch.Tensor:
        buf = self.buffers[ref.worker][ref.slot][modality][: ref.count]
        return buf.movedim(1, -1) if modality_table.get(modality).is_series else buf

    def release(self, worker: int, slot: int, copied: Any = None) -> None:
        """Nothing reads the slot any more, except (GPU) a copy ``copied`` marks the end of."""
        if copied is None:
            self.free[worker, slot] = 1
        else:
            self._pending.append((copied, worker, slot))

    def settle(self) -> None:
        """Free the slots whose host-to-device copies were pending (they are long done by the
        next fetch: the step read its loss since)."""
        for event, worker, slot in self._pending:
            event.synchronize()
            self.free[worker, slot] = 1
        self._pending = []

    def pin(self) -> None:
        """Page-lock every slot for CUDA (once), so the copy to the GPU is asynchronous: why
        `release` takes the copy's event."""
        cudart = torch.cuda.cudart()
        for slots in self.buffers:
            for slot in slots:
                for t in slot.values():
                    err = cudart.cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
                    if int(err) != 0:
                        raise RuntimeError(f"cudaHostRegister of a batch slot failed ({err})")


def _shared(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype).share_memory_()
    t.zero_()  # prefault in the training process
    return t


class SlotCollate:
    """A collate function that writes a batch's images into a slot of the calling worker and
    sends `SlotRef`s for them; in the training process itself (no workers) the plain collate."""

    def __init__(self, collate: Callable[..., dict[str, Any]], pool: SlotPool) -> None:
        self.collate, self.pool = collate, pool

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        info = get_worker_info()
        if info is None:
            return self.collate(samples)
        w = info.id
        self.pool.prefault(w)
        s = self.pool.acquire(w)
        try:
            batch = self.collate(samples, out=self.pool.buffers[w][s])
        except BaseException:
            self.pool.give_back(w, s)
            raise
        batch["images"] = {m: SlotRef(w, s, int(t.shape[0])) for m, t in batch["images"].items()}
        batch["slot"] = (w, s)
        return batch


def resolve(batch: dict[str, Any], pool: SlotPool) -> dict[str, Any]:
    """A batch from a worker with its `SlotRef`s mapped onto the training process's views."""
    if "slot" in batch:
        batch["images"] = {m: pool.view(r, m) for m, r in batch["images"].items()}
    return batch


def copy_event(device: torch.device) -> Any:
    """After `collate.to_device`: on a GPU an event marking the end of the batch's host-to-device
    copies (what a slot's release waits on); None on the CPU."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def release(batch: Mapping[str, Any], copied: Any = None) -> None:
    """Give a fetched batch's slot back (a batch without one: nothing to do). Call it once the
    batch's images are no longer read: after the backward of its micro-batch."""
    done = batch.get("release")
    if done is not None:
        done(copied)
