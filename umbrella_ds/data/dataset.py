"""InstructionDataset: rendered tasks + images read from the shards, with seeded augmentation.

Items are addressed by ``(epoch, index)`` (what ResumableSampler yields); a plain int means epoch 0.
All randomness of an item (series window start, flip axes) comes from a numpy Generator seeded by
(seed, epoch, index), so an item is the same whatever the number of workers, ranks or resumes.

Shards are opened lazily, inside the process that first reads (each DataLoader worker opens its
own after the fork). `shards` may also be an already opened reader object (duck-typed: `read`,
`read_window`, `num_frames`), which tests use.

Series windows (rsfMRI, or any modality the table marks as a series) of `series_length` frames:
- ``windows="random"``: training draws a start from {0, stride, 2*stride, ...} up to the last start
  that fits; evaluation uses start 0 (the predecessor's first window), so eval items are fixed.
- ``windows="first"``: start 0 always.
- ``windows="non_overlapping"``: the predecessor's windows [k*L, (k+1)*L). Each task then becomes
  one item per window, so ``len(dataset)`` is the sum over tasks of the number of whole windows
  (the minimum over the task's series images; tasks without a series keep one item). This needs the
  frame counts when the dataset is built, read from the shard index in the building process.

Flip: in training with flip=True each spatial axis of each image is flipped with probability 1/2;
never in evaluation. Item images may be views (flipped, time axis last over the stored
frames-first window); the collate copies each once, into the batch (`collate.stack_images`).
`item(key, deferred=True)` (the loader with batch slots, `DeferredImages`) reads nothing: its
images are `ImageRead`s, which the collate decodes straight into their place in a batch slot.

Samples longer than the renderer's max_length are handled when the dataset is built (tokens do
not depend on randomness): rejected tasks are dropped and counted in `num_rejected`, truncated
ones counted in `num_truncated`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from umbrella_ds import modality as modality_table

from .instructions import Task
from .render import EvalSample, RenderedSample, Renderer, SampleTooLongError

WindowMode = Literal["random", "non_overlapping", "first"]

_SCRATCH: dict[tuple[tuple[int, ...], str], np.ndarray] = {}


def _scratch(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A per-process buffer of ``shape``, allocated once and reused: where a flipped image is
    decoded before its one (flipped) copy into the batch slot."""
    key = (tuple(shape), np.dtype(dtype).str)
    buf = _SCRATCH.get(key)
    if buf is None:
        buf = _SCRATCH[key] = np.empty(shape, dtype=dtype)
    return buf


@dataclass(frozen=True)
class ImageRead:
    """One image of an item, not read yet: where it is stored and how it is flipped.

    ``read()`` gives what a plain item holds (a view, flipped and, for a series, time-last);
    ``read_into(out)`` writes it once into ``out`` in the stored layout ((D,H,W) for a volume,
    (T,D,H,W) for a series window: the batch slot's layout). An unflipped image is decoded
    straight into ``out``. A flipped one is decoded into a reused per-process scratch and copied
    flipped into ``out``: numpy cannot flip in place without its own temporary (the halves of a
    flip along an inner axis interleave), and the scratch is the same bytes, allocated once.
    """

    reader: Any
    subject: str
    modality: str
    start: int | None  # window start (series), None for a volume
    length: int
    flip: tuple[int, ...]  # spatial axes (0, 1, 2 of D, H, W)

    def _raw(self, out: np.ndarray | None = None) -> np.ndarray:
        """The stored layout: (D,H,W) or (T,D,H,W); into ``out`` when the reader can."""
        kw = {"out": out} if out is not None else {}
        if self.start is None:
            return self.reader.read(self.subject, self.modality, **kw)
        arr = self.reader.read_window(self.subject, self.modality, self.start, self.length, **kw)
        return np.moveaxis(arr, -1, 0)

    def read(self) -> np.ndarray:
        arr = self._raw()
        if self.start is not None:
            arr = np.moveaxis(arr, 0, -1)
        return np.flip(arr, axis=self.flip) if self.flip else arr

    def read_into(self, out: np.ndarray) -> None:
        into = getattr(self.reader, "reads_into", False)
        if not self.flip and into:
            self._raw(out)
            return
        src = self._raw(_scratch(out.shape, out.dtype)) if into else self._raw()
        axes = tuple(a + (self.start is not None) for a in self.flip)
        np.copyto(out, np.flip(src, axis=axes) if axes else src)


def _open_shards(path: Path):
    from umbrella_ds.shards import open_dataset  # imported late: only processes that read need it

    return open_dataset(path)


def _windowed(name: str) -> bool:
    """A series modality (the table says): items read a window of frames, not the whole image."""
    return modality_table.get(name).is_series


class InstructionDataset:
    """Map-style dataset over `(epoch, index)`; see the module docstring for the policies."""

    def __init__(
        self,
        tasks: Sequence[Task],
        shards: str | Path | Any,
        renderer: Renderer,
        *,
        train: bool,
        seed: int,
        series_length: int,
        window_stride: int = 1,
        windows: WindowMode = "random",
        flip: bool = True,
    ) -> None:
        if windows not in ("random", "non_overlapping", "first"):
            raise ValueError(f"windows must be random, non_overlapping or first, got {windows!r}")
        if series_length < 1 or window_stride < 1:
            raise ValueError(
                f"series_length and window_stride must be >= 1, got {series_length}, {window_stride}"
            )
        self.train = bool(train)
        self.seed = int(seed)
        self.series_length = int(series_length)
        self.window_stride = int(window_stride)
        self.windows = windows
        self.flip = bool(flip) and self.train
        self.renderer = renderer
        if isinstance(shards, (str, os.PathLike)):
            self._shards_path: Path | None = Path(shards)
            self._shards = None
        else:
            self._shards_path = None
            self._shards = shards
        self._shards_pid = os.getpid()

        self.tasks: list[Task] = []
        self._rendered: list[RenderedSample] = []
        self._eval: list[EvalSample | None] = []
        self.num_rejected = 0
        self.num_truncated = 0
        self.rejected_task_ids: list[str] = []
        for task in tasks:
            try:
                rendered = renderer.render_train(task)
                ev = None if self.train else renderer.render_eval(task)
            except SampleTooLongError:
                self.num_rejected += 1
                self.rejected_task_ids.append(task.task_id)
                continue
            self.num_truncated += int(rendered.truncated)
            self.tasks.append(task)
            self._rendered.append(rendered)
            self._eval.append(ev)

        # items: (task number, window number); window number is only used by non_overlapping.
        if windows == "non_overlapping":
            self._items = self._window_items()
        else:
            self._items = [(t, 0) for t in range(len(self.tasks))]

    # -- shards ----------------------------------------------------------------------------------

    @property
    def shards(self):
        """The reader for this process (reopened after a fork if a path was given)."""
        if self._shards_path is None:
            return self._shards
        if self._shards is None or self._shards_pid != os.getpid():
            self._shards = _open_shards(self._shards_path)
            self._shards_pid = os.getpid()
        return self._shards

    def __getstate__(self) -> dict[str, Any]:
        # Spawned workers and pickling never carry an open reader made from a path.
        state = dict(self.__dict__)
        if self._shards_path is not None:
            state["_shards"] = None
        return state

    def _window_items(self) -> list[tuple[int, int]]:
        reader = self.shards if self._shards_path is None else _open_shards(self._shards_path)
        items = []
        for t, task in enumerate(self.tasks):
            counts = [
                self._num_windows(reader.num_frames(im.subject_id), im.subject_id, task)
                for im in task.images
                if _windowed(im.modality)
            ]
            n = min(counts) if counts else 1
            items.extend((t, k) for k in range(n))
        return items

    def _num_windows(self, frames: int, subject: str, task: Task) -> int:
        if frames < self.series_length:
            raise ValueError(
                f"task {task.task_id!r}: subject {subject} has {frames} rsfMRI frames, fewer than "
                f"the window length {self.series_length}"
            )
        return frames // self.series_length

    # -- items -----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._items)

    def window_start(self, task: Task, subject: str, window: int, rng: np.random.Generator) -> int:
        frames = int(self.shards.num_frames(subject))
        length = self.series_length
        if frames < length:
            raise ValueError(
                f"task {task.task_id!r}: subject {subject} has {frames} rsfMRI frames, fewer than "
                f"the window length {length}"
            )
        if self.windows == "non_overlapping":
            return window * length
        if self.windows == "first" or not self.train:
            return 0
        n_starts = (frames - length) // self.window_stride + 1
        return int(rng.integers(n_starts)) * self.window_stride

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        return self.item(key)

    def item(self, key: tuple[int, int] | int, deferred: bool = False) -> dict[str, Any]:
        """The item at ``key``; ``deferred``: its images as `ImageRead`s, nothing read yet (the
        same randomness is drawn in the same order, so the images are the same)."""
        epoch, index = key if isinstance(key, tuple) else (0, key)
        t, window = self._items[index]
        task = self.tasks[t]
        rng = np.random.default_rng([self.seed, int(epoch), int(index)])
        images: list[tuple[str, Any]] = []
        starts: list[int | None] = []
        for im in task.images:
            start = None
            if _windowed(im.modality):
                start = self.window_start(task, im.subject_id, window, rng)
            starts.append(start)
            axes: tuple[int, ...] = ()
            if self.flip:
                axes = tuple(int(a) for a in np.flatnonzero(rng.random(3) < 0.5))
            read = ImageRead(
                self.shards, im.subject_id, im.modality, start, self.series_length, axes
            )
            # deferred: the collate reads it into the batch; else a view the collate copies once
            images.append((im.modality, read if deferred else read.read()))
        rendered = self._rendered[t]
        item: dict[str, Any] = {
            "input_ids": rendered.input_ids,
            "labels": rendered.labels,
            "images": images,
            "task_id": task.task_id,
            "task_type": task.task_type,
            "subject_ids": [im.subject_id for im in task.images],
            "metadata": task.metadata,
            "window_start": starts,
        }
        ev = self._eval[t]
        if ev is not None:
            item["prompt_ids"] = ev.prompt_ids
            item["target_text"] = ev.target_text
        return item


class DeferredImages:
    """A dataset's items with `ImageRead`s for images: what a loader with batch slots reads."""

    def __init__(self, dataset: InstructionDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        return self.dataset.item(key, deferred=True)
