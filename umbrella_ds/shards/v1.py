"""Format v1, read for conversion only: ``umbrella-pack upgrade`` reads v1 shards through this
reader, and ``verify`` and ``info`` open v1 datasets with it; training never does (it reads v2).

v1 shards have no digest datasets; their image datasets carry HDF5's ``fletcher32`` filter,
checked by HDF5 on every read (docs/FORMAT.md "v1").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from umbrella_ds import modality as modality_table
from umbrella_ds.shards.format import (
    CORRUPT,
    FRAMES_PER_CHUNK,
    V1,
    ShardCorruptError,
    ShardError,
    UpgradeRequiredError,
    chunk_owner,
    dataset_name,
    n_chunks,
)
from umbrella_ds.shards.reader import ShardDataset


class V1Dataset(ShardDataset):
    """A v1 dataset: the metadata API of :class:`ShardDataset`, images read through HDF5
    (``read_direct`` straight into the array, fletcher32 verified by HDF5)."""

    VERSION = V1

    def _read_hdf5(self, shard: int, name: str, sel: Any, out: np.ndarray, what: str) -> None:
        try:
            self._file(shard)[name].read_direct(out, sel)
        except ShardError:
            raise
        except (OSError, KeyError, ValueError) as exc:
            path = self._shard_path(shard)
            if "filter returned failure" in str(exc):  # fletcher32: the chunk's bytes changed
                raise ShardCorruptError(
                    f"{path}: {CORRUPT} (fletcher32 checksum failed reading {what})"
                ) from exc
            raise ShardError(f"{path}: cannot read {name} ({exc})") from exc

    def read(self, subject: str, modality: str, out: np.ndarray | None = None) -> np.ndarray:
        rec = self._modality_entry(subject, modality)
        if modality_table.get(modality).is_series:
            return self.read_window(subject, modality, 0, rec["frames"])
        row = int(rec["row"])
        what = f"subject {subject} {modality} (chunk {row})"
        out = self._out(out, self.shape(modality), what)
        self._read_hdf5(self._entry(subject)["shard"], dataset_name(modality), row, out, what)
        return out

    def read_window(
        self, subject: str, modality: str, start: int, length: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        rec = self._window(subject, modality, start, length)
        off = rec["offset"] + start
        out = self._out(
            out, (length, *self.shape(modality)), f"subject {subject} {modality} window"
        )
        first, last = off // FRAMES_PER_CHUNK, (off + length - 1) // FRAMES_PER_CHUNK
        what = f"subject {subject} {modality} frames {start}..{start + length} (chunks {first}..{last})"
        sel = np.s_[off : off + length]
        self._read_hdf5(self._entry(subject)["shard"], dataset_name(modality), sel, out, what)
        return np.moveaxis(out, 0, -1)


def open_any(path: str | os.PathLike[str]) -> ShardDataset:
    """A dataset in any format this package knows: v2 (the training reader) or v1 (this one)."""
    try:
        return ShardDataset(path)
    except UpgradeRequiredError:  # raised only for a known older version: v1
        return V1Dataset(path)


def chunk_problems_v1(path: Path) -> list[str]:
    """Every image chunk of one v1 shard read through HDF5, whose fletcher32 filter fails on
    damage; one problem per damaged chunk, naming its subject."""
    problems: list[str] = []
    try:
        with h5py.File(path, "r") as f:
            for name in map(dataset_name, modality_table.names()):
                if name not in f:
                    continue
                ds = f[name]
                step = ds.chunks[0]
                for k in range(n_chunks(ds)):
                    try:
                        ds[k * step : (k + 1) * step]
                    except OSError as exc:
                        how = f"unreadable: {exc}"
                        if "filter returned failure" in str(exc):
                            how = "fletcher32 checksum failed"
                        who = chunk_owner(f, name, k, step)
                        problems.append(f"{path}: {CORRUPT} ({how} in {name} chunk {k}, {who})")
    except (OSError, KeyError, ValueError) as exc:
        problems.append(f"{path}: unreadable ({exc})")
    return problems
