"""THE shard format (v1): writer, reader, index, verify and info. One source of truth.

A dataset directory holds ``shard-00000.h5`` ... and ``index.json`` (written last). Packing
(``data_prep``) writes shards through :class:`ShardWriter` and the index through
:func:`write_index`; training reads through :func:`open_dataset`. The layout is specified in
``docs/FORMAT.md``; the names of files, datasets and attributes live here only.
"""

from __future__ import annotations

import atexit
import errno
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin  # registers the Blosc filter, so blosc shards read anywhere shards.py is imported
import numpy as np

from umbrella_ds import __version__

FORMAT_NAME = "umbrella-shards"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
REJECTED_NAME = "rejected.csv"
DTYPE = np.float16
MODALITIES = ("T1", "rsfMRI")
# rsfMRI frames per HDF5 chunk: a 24-frame window touches 6-7 chunks, a whole chunk stays
# small enough (8 x 96^3 x 2 B = 14 MB) that reading one frame does not drag in a series.
FRAMES_PER_CHUNK = 8
COMPRESSIONS = ("none", "lzf", "gzip", "blosc")
# HDF5 chunk cache per open shard. Training reads each volume once per epoch in random order,
# so a cache only adds a copy and, with hundreds of shards open per worker, memory; reads go
# straight into the caller's array (measured: benchmarks/read_path.py).
CHUNK_CACHE_BYTES = 0
# The cheap check hashes this much of each end of a shard (small shards: the whole file).
STAMP_BYTES = 1 << 20
# One wording for a damaged shard, whether `umbrella-pack verify` or training's start-up check
# finds it, so the user greps one message and finds one remedy.
CORRUPT = (
    "corrupt: its bytes changed since packing; restore it or re-pack (umbrella-pack build --resume)"
)

# Dataset and attribute names inside a shard file.
DS_T1 = "T1"
DS_T1_SUBJECTS = "T1_subjects"
DS_RS_FRAMES = "rsfMRI_frames"
DS_RS_SUBJECTS = "rsfMRI_subjects"
DS_RS_OFFSETS = "rsfMRI_offsets"
ATTR_META = "meta_json"


class ShardError(Exception):
    """A shard is missing, corrupt or inconsistent with the index; the message names the file."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.h5"


def shard_of(subject_position: int, subjects_per_shard: int) -> int:
    """Subject i of the manifest lives in shard i // subjects_per_shard, whatever was rejected."""
    return subject_position // subjects_per_shard


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def stamp_file(path: Path) -> str:
    """Cheap verify stamp: hash of the size and the first and last STAMP_BYTES of the file.

    Catches truncation, replacement and damage to the HDF5 superblock and metadata at the
    ends of the file without reading terabytes; chunk damage elsewhere is caught by the
    per-chunk fletcher32 on every read.
    """
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(STAMP_BYTES))
        if size > STAMP_BYTES:
            f.seek(max(STAMP_BYTES, size - STAMP_BYTES))
            h.update(f.read(STAMP_BYTES))
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary name, flush, fsync, rename: readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _compression_kwargs(compression: str) -> dict[str, Any]:
    if compression == "none":
        return {}
    if compression == "lzf":
        return {"compression": "lzf"}
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 4}
    if compression == "blosc":
        # lz4 with byte shuffle: float16 volumes compress on their exponent bytes, decode fast.
        return dict(hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE))
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
        compression: str,
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
        self._ckw = _compression_kwargs(compression)
        self.compression = compression
        self._subjects: list[dict[str, Any]] = []
        self._rejections: list[dict[str, str]] = []
        self._t1_ids: list[str] = []
        self._rs_ids: list[str] = []
        self._rs_offsets = [0]
        self._f = h5py.File(self.tmp, "w", track_order=False)
        self._t1 = None
        self._rs = None
        if "T1" in self.shapes:
            d, h, w = self.shapes["T1"]
            self._t1 = self._f.create_dataset(
                DS_T1,
                shape=(0, d, h, w),
                maxshape=(None, d, h, w),
                dtype=DTYPE,
                chunks=(1, d, h, w),
                fletcher32=True,
                track_times=False,
                **self._ckw,
            )
        if "rsfMRI" in self.shapes:
            d, h, w = self.shapes["rsfMRI"]
            self._rs = self._f.create_dataset(
                DS_RS_FRAMES,
                shape=(0, d, h, w),
                maxshape=(None, d, h, w),
                dtype=DTYPE,
                chunks=(FRAMES_PER_CHUNK, d, h, w),
                fletcher32=True,
                track_times=False,
                **self._ckw,
            )

    def add_subject(
        self,
        subject_id: str,
        position: int,
        phenotypes: dict[str, Any],
        volumes: dict[str, np.ndarray],
        meta: dict[str, dict[str, Any]],
    ) -> None:
        """Append one subject; ``volumes['T1']`` is (D,H,W), ``volumes['rsfMRI']`` is (T,D,H,W)."""
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
            if modality == "T1":
                if self._t1 is None or arr.shape != self.shapes["T1"]:
                    raise ValueError(
                        f"{subject_id} T1: shape {arr.shape} != {self.shapes.get('T1')}"
                    )
                row = self._t1.shape[0]
                self._t1.resize(row + 1, axis=0)
                self._t1[row] = arr
                self._t1_ids.append(subject_id)
                rec["row"] = row
            elif modality == "rsfMRI":
                if self._rs is None or arr.ndim != 4 or arr.shape[1:] != self.shapes["rsfMRI"]:
                    raise ValueError(
                        f"{subject_id} rsfMRI: shape {arr.shape} != (T, {self.shapes.get('rsfMRI')})"
                    )
                start = self._rs.shape[0]
                self._rs.resize(start + arr.shape[0], axis=0)
                self._rs[start:] = arr
                self._rs_ids.append(subject_id)
                self._rs_offsets.append(start + arr.shape[0])
                rec["offset"] = start
                rec["frames"] = int(arr.shape[0])
            else:
                raise ValueError(f"unknown modality {modality!r}")
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
        self._f.create_dataset(
            DS_T1_SUBJECTS,
            data=np.array(self._t1_ids, dtype=object),
            dtype=str_dt,
            track_times=False,
        )
        self._f.create_dataset(
            DS_RS_SUBJECTS,
            data=np.array(self._rs_ids, dtype=object),
            dtype=str_dt,
            track_times=False,
        )
        self._f.create_dataset(
            DS_RS_OFFSETS, data=np.array(self._rs_offsets, dtype=np.int64), track_times=False
        )
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "tool_version": __version__,
            "shard": self.shard,
            "job": self.job,
            "compression": self.compression,
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
        record = _record_for(self.tmp, meta, self.final.name)
        os.replace(self.tmp, self.final)
        _fsync_dir(self.out_dir)
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
            _keep_unclosable((self._f, self._t1, self._rs))
        finally:
            self.tmp.unlink(missing_ok=True)


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


def _record_for(path: Path, meta: dict[str, Any], name: str) -> ShardRecord:
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


def read_shard_meta(path: Path) -> dict[str, Any]:
    """The self-description stored inside a shard (raises ShardError naming the file)."""
    try:
        with h5py.File(path, "r") as f:
            return json.loads(f.attrs[ATTR_META])
    except (OSError, KeyError, ValueError) as exc:
        raise ShardError(f"{path}: cannot read shard metadata ({exc})") from exc


def reuse_shard(path: Path, job: str) -> ShardRecord | None:
    """Record of an existing shard if it was built for exactly this job and reads back intact.

    Used by ``--resume``: the job hash covers the shard's manifest rows, the preprocessing and
    the format, so a kept shard is one the current run would write again; every chunk is read
    so fletcher32 catches damage.
    """
    if not path.is_file():
        return None
    try:
        meta = read_shard_meta(path)
        if meta.get("job") != job or meta.get("format_version") != FORMAT_VERSION:
            return None
        with h5py.File(path, "r") as f:
            for name in (DS_T1, DS_RS_FRAMES):
                if name in f:
                    ds = f[name]
                    step = ds.chunks[0] if ds.chunks else 1
                    for i in range(0, ds.shape[0], step):
                        ds[i : i + step]
    except (ShardError, OSError):
        return None
    return _record_for(path, meta, path.name)


def build_index(
    records: Iterable[ShardRecord],
    *,
    shapes: dict[str, tuple[int, ...]],
    preprocessing: dict[str, Any],
    compression: str,
    subjects_per_shard: int,
) -> dict[str, Any]:
    """Index content: deterministic (no timestamps, no host names) so its hash is a fingerprint."""
    records = sorted(records, key=lambda r: r.shard)
    subjects = [s for r in records for s in sorted(r.subjects, key=lambda s: s["position"])]
    present = [m for m in MODALITIES if any(m in s["modalities"] for s in subjects)]
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "tool_version": __version__,
        "dtype": "float16",
        "compression": compression,
        "subjects_per_shard": subjects_per_shard,
        "frames_per_chunk": FRAMES_PER_CHUNK,
        "modalities": present,
        "shapes": {m: list(shapes[m]) for m in present},
        "preprocessing": preprocessing,
        "shards": [
            {
                "shard": r.shard,
                "file": r.file,
                "sha256": r.sha256,
                "bytes": r.bytes,
                "stamp": r.stamp,
            }
            for r in records
        ],
        "subjects": subjects,
        "num_rejections": sum(len(r.rejections) for r in records),
    }


def write_index(out_dir: Path, index: dict[str, Any]) -> None:
    atomic_write_text(
        Path(out_dir) / INDEX_NAME, json.dumps(index, indent=1, sort_keys=True) + "\n"
    )


class ShardDataset:
    """Reader over a shard directory. Files open lazily in the process that reads them.

    h5py handles must not cross a fork (DataLoader workers): the opening pid is recorded and a
    forked child drops the inherited handles and opens its own. Pickling (spawn workers) drops
    handles too.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        index_path = self.path / INDEX_NAME
        try:
            raw = index_path.read_bytes()
        except OSError as exc:
            raise ShardError(f"{index_path}: cannot read index ({exc})") from exc
        try:
            self._index = json.loads(raw)
        except ValueError as exc:
            raise ShardError(f"{index_path}: invalid JSON ({exc})") from exc
        if self._index.get("format") != FORMAT_NAME:
            raise ShardError(f"{index_path}: not an {FORMAT_NAME} index")
        if self._index.get("format_version") != FORMAT_VERSION:
            raise ShardError(
                f"{index_path}: format version {self._index.get('format_version')} "
                f"(this reader reads {FORMAT_VERSION})"
            )
        self._fingerprint = hashlib.sha256(raw).hexdigest()
        self._by_id = {s["id"]: s for s in self._index["subjects"]}
        self._shard_files = {s["shard"]: s["file"] for s in self._index["shards"]}
        self._pid = os.getpid()
        self._files: dict[int, h5py.File] = {}

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

    def num_frames(self, subject: str) -> int:
        return int(self._modality_entry(subject, "rsfMRI")["frames"])

    def _modality_entry(self, subject: str, modality: str) -> dict[str, Any]:
        entry = self._entry(subject)
        try:
            return entry["modalities"][modality]
        except KeyError:
            raise KeyError(f"{self.path}: subject {subject!r} has no {modality}") from None

    # -- data -----------------------------------------------------------------------------
    def _file(self, shard: int) -> h5py.File:
        pid = os.getpid()
        if pid != self._pid:  # forked: the inherited handles belong to the parent
            self._files = {}
            self._pid = pid
        f = self._files.get(shard)
        if f is None:
            path = self.path / self._shard_files[shard]
            try:
                f = h5py.File(path, "r", rdcc_nbytes=CHUNK_CACHE_BYTES)
            except OSError as exc:
                raise ShardError(f"{path}: cannot open shard ({exc})") from exc
            self._files[shard] = f
        return f

    def _read(self, shard: int, name: str, sel: Any, shape: tuple[int, ...]) -> np.ndarray:
        """Read ``sel`` straight into a new float16 array (fletcher32 verified by HDF5)."""
        try:
            out = np.empty(shape, dtype=DTYPE)
            self._file(shard)[name].read_direct(out, sel)
            return out
        except ShardError:
            raise
        except (OSError, KeyError, ValueError) as exc:
            path = self.path / self._shard_files[shard]
            if "filter returned failure" in str(exc):  # fletcher32: the chunk's bytes changed
                raise ShardError(f"{path}: {CORRUPT} (checksum failed reading {name})") from exc
            raise ShardError(f"{path}: cannot read {name} ({exc})") from exc

    def read(self, subject: str, modality: str) -> np.ndarray:
        """Whole stored image: T1 (D,H,W); rsfMRI (D,H,W,T), float16."""
        rec = self._modality_entry(subject, modality)
        shard = self._entry(subject)["shard"]
        if modality == "T1":
            return self._read(shard, DS_T1, np.s_[rec["row"]], self.shape("T1"))
        if modality == "rsfMRI":
            return self.read_window(subject, modality, 0, rec["frames"])
        raise KeyError(f"unknown modality {modality!r}")

    def read_window(self, subject: str, modality: str, start: int, length: int) -> np.ndarray:
        """Frames [start, start+length) as (D,H,W,length) float16 (a transposed view, no copy)."""
        if modality != "rsfMRI":
            raise KeyError(f"read_window reads rsfMRI, not {modality!r}")
        rec = self._modality_entry(subject, modality)
        if start < 0 or length <= 0 or start + length > rec["frames"]:
            raise IndexError(
                f"{subject}: window [{start}, {start + length}) outside 0..{rec['frames']} frames"
            )
        off = rec["offset"] + start
        frames_tdhw = self._read(
            self._entry(subject)["shard"],
            DS_RS_FRAMES,
            np.s_[off : off + length],
            (length, *self.shape("rsfMRI")),
        )
        return np.moveaxis(frames_tdhw, 0, -1)

    # -- integrity ------------------------------------------------------------------------
    def check(self) -> None:
        """Cheap start-of-training check: every shard exists with its recorded size and stamp."""
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
            for f in self._files.values():
                f.close()
        self._files = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_files"] = {}
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
    """Open a packed dataset directory (reads index.json only; shards open on first read)."""
    return ShardDataset(path)


def verify(path: str | os.PathLike[str]) -> list[str]:
    """Full re-check: every shard's sha256, size, datasets and shapes against the index.

    Returns the list of problems (empty when the dataset is sound); each names its file.
    """
    root = Path(path)
    try:
        ds = open_dataset(root)
    except ShardError as exc:
        return [str(exc)]
    idx = ds.index
    problems: list[str] = []
    by_shard: dict[int, list[dict[str, Any]]] = {}
    for s in idx["subjects"]:
        by_shard.setdefault(s["shard"], []).append(s)
    for rec in idx["shards"]:
        spath = root / rec["file"]
        if not spath.is_file():
            problems.append(f"{spath}: shard missing")
            continue
        if spath.stat().st_size != rec["bytes"]:
            problems.append(f"{spath}: size {spath.stat().st_size} != {rec['bytes']} in index")
        if sha256_file(spath) != rec["sha256"]:
            problems.append(f"{spath}: {CORRUPT} (sha256 mismatch)")
            continue
        problems.extend(_verify_contents(spath, idx, by_shard.get(rec["shard"], [])))
    known = {r["shard"] for r in idx["shards"]}
    for s in idx["subjects"]:
        if s["shard"] not in known:
            problems.append(f"{root / INDEX_NAME}: subject {s['id']} in unknown shard {s['shard']}")
    return problems


def _verify_contents(spath: Path, idx: dict[str, Any], subjects: list[dict[str, Any]]) -> list[str]:
    problems: list[str] = []
    try:
        with h5py.File(spath, "r") as f:
            t1_ids = [x.decode() if isinstance(x, bytes) else x for x in f[DS_T1_SUBJECTS][()]]
            rs_ids = [x.decode() if isinstance(x, bytes) else x for x in f[DS_RS_SUBJECTS][()]]
            offsets = f[DS_RS_OFFSETS][()]
            for m, name in (("T1", DS_T1), ("rsfMRI", DS_RS_FRAMES)):
                if m in idx["shapes"] and name in f:
                    got = tuple(f[name].shape[1:])
                    if got != tuple(idx["shapes"][m]):
                        problems.append(f"{spath}: {name} grid {got} != {idx['shapes'][m]}")
                    if f[name].dtype != DTYPE:
                        problems.append(f"{spath}: {name} dtype {f[name].dtype}")
            n_t1 = f[DS_T1].shape[0] if DS_T1 in f else 0
            n_rs = f[DS_RS_FRAMES].shape[0] if DS_RS_FRAMES in f else 0
            if n_t1 != len(t1_ids):
                problems.append(f"{spath}: {n_t1} T1 rows but {len(t1_ids)} T1 subject ids")
            if int(offsets[-1]) != n_rs:
                problems.append(f"{spath}: rsfMRI offsets end at {offsets[-1]}, frames {n_rs}")
            for s in subjects:
                t1 = s["modalities"].get("T1")
                if t1 is not None and (t1["row"] >= len(t1_ids) or t1_ids[t1["row"]] != s["id"]):
                    problems.append(f"{spath}: T1 row {t1['row']} is not subject {s['id']}")
                rs = s["modalities"].get("rsfMRI")
                if rs is not None:
                    if s["id"] not in rs_ids:
                        problems.append(f"{spath}: subject {s['id']} has no rsfMRI frames")
                        continue
                    k = rs_ids.index(s["id"])
                    if (int(offsets[k]), int(offsets[k + 1] - offsets[k])) != (
                        rs["offset"],
                        rs["frames"],
                    ):
                        problems.append(f"{spath}: rsfMRI offsets of {s['id']} disagree with index")
    except (OSError, KeyError, ValueError) as exc:
        problems.append(f"{spath}: unreadable ({exc})")
    return problems


def info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Summary for humans and scripts: counts, grids, bytes on disk, compression ratio."""
    ds = open_dataset(path)
    idx = ds.index
    disk = sum(r["bytes"] for r in idx["shards"])
    raw = 0
    counts: dict[str, int] = {}
    frames = 0
    for s in idx["subjects"]:
        for m, rec in s["modalities"].items():
            counts[m] = counts.get(m, 0) + 1
            n = int(np.prod(idx["shapes"][m]))
            if m == "rsfMRI":
                n *= rec["frames"]
                frames += rec["frames"]
            raw += n * np.dtype(DTYPE).itemsize
    return {
        "path": str(ds.path),
        "subjects": len(ds),
        "modalities": ds.modalities,
        "subjects_per_modality": counts,
        "rsfmri_frames": frames,
        "shapes": {m: list(ds.shape(m)) for m in ds.modalities},
        "dtype": idx["dtype"],
        "compression": idx["compression"],
        "shards": len(idx["shards"]),
        "bytes_on_disk": disk,
        "bytes_uncompressed": raw,
        "compression_ratio": (raw / disk) if disk else None,
        "rejections": idx["num_rejections"],
        "fingerprint": ds.fingerprint,
    }
