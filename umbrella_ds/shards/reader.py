"""The training reader: :class:`ShardDataset` over a format-v2 dataset directory.

v2 only: an older dataset is refused with the ``umbrella-pack upgrade`` command that converts
it (:class:`~umbrella_ds.shards.format.UpgradeRequiredError`); ``shards/v1.py`` reads v1 for
upgrade, verify and info.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from umbrella_ds import modality as modality_table
from umbrella_ds.shards.chunks import ChunkReader
from umbrella_ds.shards.format import (
    CORRUPT,
    DIGEST_SUFFIX,
    DTYPE,
    FORMAT_VERSION,
    INDEX_NAME,
    UPGRADE_DIR,
    ShardError,
    UpgradeRequiredError,
    dataset_name,
    stamp_file,
)
from umbrella_ds.shards.index import load_index

# HDF5 chunk cache per open shard. Training reads each volume once per epoch in random order,
# so a cache only adds a copy and, with hundreds of shards open per worker, memory; reads go
# straight into the caller's array (measured: benchmarks/read_path.py).
CHUNK_CACHE_BYTES = 0


class ShardDataset:
    """Reader over a shard directory. Files open lazily in the process that reads them.

    h5py handles must not cross a fork (DataLoader workers): the opening pid is recorded and a
    forked child drops the inherited handles and opens its own. Pickling (spawn workers) drops
    handles too.
    """

    VERSION = FORMAT_VERSION  # the one format version this class reads

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._index, raw = load_index(self.path)
        self.format_version = int(self._index["format_version"])
        if self.format_version != self.VERSION:
            raise UpgradeRequiredError(self.path, self.format_version)
        self._fingerprint = hashlib.sha256(raw).hexdigest()
        self._by_id = {s["id"]: s for s in self._index["subjects"]}
        self._shard_files = {s["shard"]: s["file"] for s in self._index["shards"]}
        self._pid = os.getpid()
        self._files: dict[int, h5py.File] = {}
        self._chunked: dict[tuple[int, str], ChunkReader] = {}
        self._scratch: dict[str, np.ndarray] = {}  # one decode buffer per dataset name

    # -- metadata -------------------------------------------------------------------------
    @property
    def index(self) -> dict[str, Any]:
        return self._index

    @property
    def subjects(self) -> list[str]:
        return [s["id"] for s in self._index["subjects"]]

    @property
    def modalities(self) -> list[str]:
        return list(self._index["modalities"])

    @property
    def preprocessing(self) -> dict[str, Any]:
        return self._index["preprocessing"]

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def shape(self, modality: str) -> tuple[int, ...]:
        try:
            return tuple(self._index["shapes"][modality])
        except KeyError:
            raise KeyError(
                f"{self.path}: no modality {modality!r} (have {self.modalities})"
            ) from None

    def _entry(self, subject: str) -> dict[str, Any]:
        try:
            return self._by_id[subject]
        except KeyError:
            raise KeyError(f"{self.path}: unknown subject {subject!r}") from None

    def has(self, subject: str, modality: str) -> bool:
        entry = self._by_id.get(subject)
        return entry is not None and modality in entry["modalities"]

    def phenotypes(self, subject: str) -> dict[str, Any]:
        return dict(self._entry(subject)["phenotypes"])

    def subject_info(self, subject: str, modality: str) -> dict[str, Any]:
        """Provenance of one stored image (source path, checksum, shapes, affine, statistics)."""
        return dict(self._modality_entry(subject, modality))

    def num_frames(self, subject: str, modality: str | None = None) -> int:
        """Frames of a subject's series (default: the first series modality it has)."""
        if modality is None:
            series = modality_table.series_names()
            have = [m for m in series if self.has(subject, m)]
            modality = (have or list(series))[0]
        return int(self._modality_entry(subject, modality)["frames"])

    def _modality_entry(self, subject: str, modality: str) -> dict[str, Any]:
        entry = self._entry(subject)
        try:
            return entry["modalities"][modality]
        except KeyError:
            raise KeyError(f"{self.path}: subject {subject!r} has no {modality}") from None

    # -- data -----------------------------------------------------------------------------
    def _own_handles(self) -> None:
        pid = os.getpid()
        if pid != self._pid:  # forked: the inherited handles belong to the parent
            self._files = {}
            self._chunked = {}
            self._scratch = {}
            self._pid = pid

    def _file(self, shard: int) -> h5py.File:
        self._own_handles()
        f = self._files.get(shard)
        if f is None:
            path = self.path / self._shard_files[shard]
            try:
                f = h5py.File(path, "r", rdcc_nbytes=CHUNK_CACHE_BYTES)
            except OSError as exc:
                raise ShardError(f"{path}: cannot open shard ({exc})") from exc
            self._files[shard] = f
        return f

    def _shard_path(self, shard: int) -> Path:
        return self.path / self._shard_files[shard]

    def _reader(self, shard: int, name: str) -> ChunkReader:
        self._own_handles()
        key = (shard, name)
        r = self._chunked.get(key)
        if r is None:
            f = self._file(shard)
            try:
                r = ChunkReader(f[name], f[name + DIGEST_SUFFIX][()], self._shard_path(shard))
            except KeyError as exc:
                raise ShardError(f"{self._shard_path(shard)}: cannot read {name} ({exc})") from exc
            self._chunked[key] = r
        return r

    def _scratch_for(self, name: str, nbytes: int) -> np.ndarray:
        buf = self._scratch.get(name)
        if buf is None or buf.nbytes < nbytes:
            buf = np.empty(nbytes, dtype=np.uint8)
            self._scratch[name] = buf
        return buf

    # Readers that take ``out=`` (the loader's batch slots decode straight into them).
    reads_into = True

    def _out(self, out: np.ndarray | None, shape: tuple[int, ...], what: str) -> np.ndarray:
        """``out`` checked against the read's shape, or a new array (first-touch faults included)."""
        if out is None:
            return np.empty(shape, dtype=DTYPE)
        if out.shape != shape or out.dtype != DTYPE or not out.flags.c_contiguous:
            raise ValueError(
                f"{what}: out must be a C-contiguous {np.dtype(DTYPE).name} array of shape "
                f"{shape}, got {out.dtype} {out.shape}"
            )
        return out

    def read(self, subject: str, modality: str, out: np.ndarray | None = None) -> np.ndarray:
        """Whole stored image: a volume (D,H,W) (T1); a series (D,H,W,T) (rsfMRI), float16.

        ``out`` (volumes only): a C-contiguous float16 (D,H,W) array the image is read and decoded
        straight into (no array allocated; the loader's reused batch slots)."""
        rec = self._modality_entry(subject, modality)
        shard = self._entry(subject)["shard"]
        if not modality_table.is_known(modality):
            raise KeyError(f"unknown modality {modality!r}")
        if not modality_table.get(modality).is_series:
            row = int(rec["row"])
            name = dataset_name(modality)
            out = self._out(
                out, self.shape(modality), f"subject {subject} {modality} (chunk {row})"
            )
            r = self._reader(shard, name)
            scratch = self._scratch_for(name, r.raw_cap)
            r.read_chunk(
                row, out.reshape(-1).view(np.uint8), scratch, f"subject {subject} {modality}"
            )
            return out
        if out is not None:
            raise ValueError(f"read(out=...) reads volumes; use read_window for {modality}")
        return self.read_window(subject, modality, 0, rec["frames"])

    def _window(self, subject: str, modality: str, start: int, length: int) -> dict[str, Any]:
        """The index entry of a series window's subject, the window checked against it."""
        if modality not in modality_table.series_names():
            series = ", ".join(modality_table.series_names())
            raise KeyError(f"read_window reads {series}, not {modality!r}")
        rec = self._modality_entry(subject, modality)
        if start < 0 or length <= 0 or start + length > rec["frames"]:
            raise IndexError(
                f"{subject}: window [{start}, {start + length}) outside 0..{rec['frames']} frames"
            )
        return rec

    def read_window(
        self, subject: str, modality: str, start: int, length: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Frames [start, start+length) as (D,H,W,length) float16 (a transposed view, no copy).

        The frames are stored time-first and read that way: ``out``, if given, is a C-contiguous
        float16 (length,D,H,W) array they are read and decoded straight into (the loader's batch
        slot); the (D,H,W,length) view of it is returned."""
        rec = self._window(subject, modality, start, length)
        shard = self._entry(subject)["shard"]
        name = dataset_name(modality)
        shape = (length, *self.shape(modality))
        out = self._out(out, shape, f"subject {subject} {modality} window")
        r = self._reader(shard, name)
        scratch = self._scratch_for(name, r.raw_cap + r.chunk_nbytes)
        r.read_rows(rec["offset"] + start, out, scratch, subject, start, modality)
        return np.moveaxis(out, 0, -1)

    # -- integrity ------------------------------------------------------------------------
    def check(self) -> None:
        """Cheap start-of-training check: every shard exists with its recorded size and stamp."""
        if (self.path / UPGRADE_DIR / INDEX_NAME).is_file():
            raise ShardError(
                f"{self.path}: an interrupted `umbrella-pack upgrade`; rerun it to finish"
            )
        for rec in self._index["shards"]:
            path = self.path / rec["file"]
            if not path.is_file():
                raise ShardError(f"{path}: shard missing")
            size = path.stat().st_size
            if size != rec["bytes"]:
                raise ShardError(f"{path}: size {size} bytes, index says {rec['bytes']}")
            if stamp_file(path) != rec["stamp"]:
                raise ShardError(f"{path}: {CORRUPT} (verify stamp mismatch)")

    def close(self) -> None:
        if os.getpid() == self._pid:
            for r in self._chunked.values():
                r.close()
            for f in self._files.values():
                f.close()
        self._files = {}
        self._chunked = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_files"] = {}
        state["_chunked"] = {}
        state["_scratch"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self._index["subjects"])

    def __repr__(self) -> str:
        return (
            f"ShardDataset({str(self.path)!r}, subjects={len(self)}, modalities={self.modalities})"
        )


def open_dataset(path: str | os.PathLike[str]) -> ShardDataset:
    """Open a packed format-v2 dataset directory (reads index.json only; shards open on first
    read). An older format raises UpgradeRequiredError (one line, with the upgrade command)."""
    return ShardDataset(path)
