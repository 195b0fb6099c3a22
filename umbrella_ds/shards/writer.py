"""The shard writer (format v2 only): temp file -> datasets -> digests -> fsync -> rename.

Also the full-disk workaround: on ENOSPC, h5py can leave objects that crash the process when
freed, so a failed shard is truncated, closed once, and otherwise kept alive until the process
exits with status 1 (:meth:`ShardWriter.abort`).
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin
import numpy as np

from umbrella_ds import __version__
from umbrella_ds import modality as modality_table
from umbrella_ds.io import fsync_dir
from umbrella_ds.shards.format import (
    ALWAYS_TABLES,
    ATTR_META,
    BLOSC_CODECS,
    COMPRESSIONS,
    DIGEST_SUFFIX,
    DTYPE,
    FORMAT_NAME,
    FORMAT_VERSION,
    ShardError,
    dataset_name,
    ids_name,
    n_chunks,
    offsets_name,
    resolve_compression,
    rows_per_chunk,
    sha256_file,
    shard_name,
    slab_digests,
    slabs_per_chunk,
    stamp_file,
)


def compression_filter(compression: str) -> dict[str, Any]:
    """The h5py ``create_dataset`` keywords of a compression name (FORMAT.md lists them)."""
    if compression == "none":
        return {}
    if compression == "lzf":
        return {"compression": "lzf"}
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 4}
    if compression in BLOSC_CODECS:
        # Shuffle groups the float16 exponent bytes (or bits), which is what compresses; the
        # mantissa of noisy brain voxels does not. Constant background compresses to nothing.
        cname, clevel, shuffle = BLOSC_CODECS[compression]
        return dict(hdf5plugin.Blosc(cname=cname, clevel=clevel, shuffle=shuffle))
    raise ValueError(f"unknown compression {compression!r}; choose one of {COMPRESSIONS}")


@dataclass
class ShardRecord:
    """What the index keeps about one shard file (the integrity part is filled on close)."""

    shard: int
    file: str
    sha256: str
    bytes: int
    stamp: str
    job: str
    subjects: list[dict[str, Any]]
    rejections: list[dict[str, str]]

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def record_for(path: Path, meta: dict[str, Any], name: str) -> ShardRecord:
    """The index record of a finished shard file: its hashes and its own ``meta_json``."""
    return ShardRecord(
        shard=int(meta["shard"]),
        file=name,
        sha256=sha256_file(path),
        bytes=path.stat().st_size,
        stamp=stamp_file(path),
        job=meta["job"],
        subjects=meta["subjects"],
        rejections=meta["rejections"],
    )


class ShardWriter:
    """Builds one shard: temp name -> datasets -> flush/fsync -> checksum -> rename.

    Deterministic: datasets are written without HDF5 timestamps in a fixed order, so the same
    inputs give byte-identical files whichever process writes them.
    """

    def __init__(
        self,
        out_dir: Path,
        shard: int,
        shapes: dict[str, tuple[int, ...]],
        compression: str | dict[str, str],
        preprocessing: dict[str, Any],
        job: str,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.shard = shard
        self.final = self.out_dir / shard_name(shard)
        self.tmp = self.out_dir / f".{shard_name(shard)}.tmp{os.getpid()}"
        self.job = job
        self.preprocessing = preprocessing
        self.shapes = {m: tuple(int(x) for x in s) for m, s in shapes.items()}
        self.compressions = resolve_compression(compression, self.shapes)
        self.compression = compression if isinstance(compression, str) else "per-modality"
        self._subjects: list[dict[str, Any]] = []
        self._rejections: list[dict[str, str]] = []
        unknown = [m for m in self.shapes if not modality_table.is_known(m)]
        if unknown:
            raise ValueError(f"unknown modality {unknown}; known: {modality_table.names()}")
        # Id tables (and offsets for series) per modality, in the table's order (see ALWAYS_TABLES).
        tabled = modality_table.ordered({*ALWAYS_TABLES, *self.shapes})
        self._ids: dict[str, list[str]] = {m: [] for m in tabled}
        self._offsets: dict[str, list[int]] = {
            m: [0] for m in tabled if modality_table.get(m).is_series
        }
        self._f = h5py.File(self.tmp, "w", track_order=False)
        self._data: dict[str, h5py.Dataset] = {}
        for m in modality_table.ordered(self.shapes):
            d, h, w = self.shapes[m]
            self._data[m] = self._f.create_dataset(
                dataset_name(m),
                shape=(0, d, h, w),
                maxshape=(None, d, h, w),
                dtype=DTYPE,
                chunks=(rows_per_chunk(m), d, h, w),
                fletcher32=False,  # v2 stores xxh3 digests of its own (on close)
                track_times=False,
                **compression_filter(self.compressions[m]),
            )

    def add_subject(
        self,
        subject_id: str,
        position: int,
        phenotypes: dict[str, Any],
        volumes: dict[str, np.ndarray],
        meta: dict[str, dict[str, Any]],
    ) -> None:
        """Append one subject; a volume modality's array is (D,H,W), a series' (T,D,H,W)."""
        entry: dict[str, Any] = {
            "id": subject_id,
            "position": position,
            "shard": self.shard,
            "phenotypes": phenotypes,
            "modalities": {},
        }
        for modality in sorted(volumes):
            arr = volumes[modality]
            if arr.dtype != DTYPE:
                raise ValueError(f"{subject_id} {modality}: expected float16, got {arr.dtype}")
            rec = dict(meta.get(modality, {}))
            if not modality_table.is_known(modality):
                raise ValueError(f"unknown modality {modality!r}")
            ds = self._data.get(modality)
            want = self.shapes.get(modality)
            if not modality_table.get(modality).is_series:
                if ds is None or arr.shape != want:
                    raise ValueError(f"{subject_id} {modality}: shape {arr.shape} != {want}")
                row = ds.shape[0]
                ds.resize(row + 1, axis=0)
                ds[row] = arr
                self._ids[modality].append(subject_id)
                rec["row"] = row
            else:
                if ds is None or arr.ndim != 4 or arr.shape[1:] != want:
                    raise ValueError(f"{subject_id} {modality}: shape {arr.shape} != (T, {want})")
                start = ds.shape[0]
                ds.resize(start + arr.shape[0], axis=0)
                ds[start:] = arr
                self._ids[modality].append(subject_id)
                self._offsets[modality].append(start + arr.shape[0])
                rec["offset"] = start
                rec["frames"] = int(arr.shape[0])
            entry["modalities"][modality] = rec
        self._subjects.append(entry)

    def add_rejection(self, subject_id: str, modality: str, path: str, reason: str) -> None:
        self._rejections.append(
            {"subject_id": subject_id, "modality": modality, "path": path, "reason": reason}
        )

    def close(self) -> ShardRecord:
        """Finish the file, fsync it, hash it and move it into place atomically."""
        try:
            return self._finish()
        except (OSError, RuntimeError) as exc:  # h5py reports ENOSPC as either
            raise ShardError(_write_failed(self.final, self.out_dir, exc)) from exc

    def _finish(self) -> ShardRecord:
        str_dt = h5py.string_dtype("utf-8")
        for m, ids in self._ids.items():
            self._f.create_dataset(
                ids_name(m),
                data=np.array(ids, dtype=object),
                dtype=str_dt,
                track_times=False,
            )
            if m in self._offsets:
                self._f.create_dataset(
                    offsets_name(m),
                    data=np.array(self._offsets[m], dtype=np.int64),
                    track_times=False,
                )
        self._f.flush()  # chunks leave HDF5's cache: their stored bytes are final
        for ds in self._data.values():
            self._f.create_dataset(
                ds.name.lstrip("/") + DIGEST_SUFFIX,
                data=stored_digests(ds),
                dtype="<u8",
                track_times=False,
            )
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "tool_version": __version__,
            "shard": self.shard,
            "job": self.job,
            "compression": self.compression,
            "compressions": self.compressions,
            "shapes": {m: list(s) for m, s in self.shapes.items()},
            "preprocessing": self.preprocessing,
            "subjects": self._subjects,
            "rejections": self._rejections,
        }
        self._f.attrs[ATTR_META] = json.dumps(meta, sort_keys=True)
        self._f.flush()
        self._f.close()
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        record = record_for(self.tmp, meta, self.final.name)
        os.replace(self.tmp, self.final)
        fsync_dir(self.out_dir)
        return record

    def abort(self) -> None:
        """Drop the temporary file (a failed shard never appears under its final name).

        Called while the error that failed the shard propagates. On a full disk HDF5's close
        retries the failed flush; when that fails too, h5py leaves objects that crash the process
        (SIGSEGV) when touched or freed later. The file is garbage: truncating it first gives its
        pages back so that the one close can succeed; if it still fails, the objects are kept
        alive and never touched again.
        """
        try:
            if self.tmp.exists():
                os.truncate(self.tmp, 0)
            self._f.close()
        except (OSError, RuntimeError):
            _keep_unclosable((self._f, *self._data.values()))
        finally:
            self.tmp.unlink(missing_ok=True)


def stored_digests(ds: h5py.Dataset) -> np.ndarray:
    """The v2 digests of ``ds``: (chunks, slabs) xxh3-64 over the chunks' stored bytes."""
    step = ds.chunks[0]
    zeros = (0,) * (ds.ndim - 1)
    slabs = slabs_per_chunk(ds)
    out = np.empty((n_chunks(ds), slabs), dtype="<u8")
    for k in range(out.shape[0]):
        _, data = ds.id.read_direct_chunk((k * step, *zeros))
        out[k] = slab_digests(data, slabs)
    return out


_UNCLOSABLE: list[Any] = []  # h5py objects of files that failed to close (see ShardWriter.abort)


def _keep_unclosable(objects: Any) -> None:
    """Keep h5py objects that failed to close alive, and end the process before HDF5's own
    shutdown, which would retry the flush and crash (SIGSEGV, exit 139) instead of exiting 1.

    Only reached after a shard failed, so the process is failing anyway; the error has been
    raised to the caller, and the exit status is 1.
    """
    if not _UNCLOSABLE:
        atexit.register(_exit_before_hdf5_shutdown)
    _UNCLOSABLE.append(objects)


def _exit_before_hdf5_shutdown() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def _write_failed(final: Path, out_dir: Path, exc: BaseException) -> str:
    """A failed shard write, with the free space and, when that is the cause, a full disk."""
    try:
        free_bytes: int | None = shutil.disk_usage(out_dir).free
    except OSError:
        free_bytes = None
    full = "No space left on device" in str(exc) or getattr(exc, "errno", None) == errno.ENOSPC
    free = f"{free_bytes / 2**20:.1f} MiB free" if free_bytes is not None else "free space unknown"
    return (
        f"{final}: writing the shard failed"
        + (" because the filesystem is full" if full else f": {exc}")
        + f" ({free} on {out_dir}); no partial shard was kept and index.json was not written. "
        "Free space, then rerun with --resume to keep the complete shards"
    )
