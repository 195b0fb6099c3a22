"""THE shard format (v2; v1 still read): writer, reader, index, verify, upgrade and info.

One source of truth.

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
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blosc
import h5py
import hdf5plugin  # registers the Blosc filter, so blosc shards read anywhere shards.py is imported
import numpy as np
import xxhash

from umbrella_ds import __version__
from umbrella_ds import modality as modality_table
from umbrella_ds.io import atomic_write_text, fsync_dir

FORMAT_NAME = "umbrella-shards"
FORMAT_VERSION = 2
# Versions this reader reads. v1: HDF5 fletcher32 per chunk (a byte loop, about 2.4 GB/s, most
# of a read's cost). v2: xxh3-64 of every stored chunk in the shard, checked on every read at
# memory speed (tens of GB/s), chunks read directly and decoded here.
READ_VERSIONS = (1, 2)
INDEX_NAME = "index.json"
REJECTED_NAME = "rejected.csv"
DTYPE = np.float16
# rsfMRI frames per HDF5 chunk: a 24-frame window touches 6-7 chunks, a whole chunk stays
# small enough (8 x 96^3 x 2 B = 14 MB) that reading one frame does not drag in a series.
FRAMES_PER_CHUNK = 8
# Blosc (through hdf5plugin, decoded on read by python-blosc): codec and shuffle per name.
# "blosc" is the v1 name of lz4 + byte shuffle, kept so v1 options still mean what they meant.
BLOSC_CODECS: dict[str, tuple[str, int, int]] = {
    "blosc": ("lz4", 5, hdf5plugin.Blosc.SHUFFLE),
    "blosc-lz4": ("lz4", 5, hdf5plugin.Blosc.SHUFFLE),
    "blosc-lz4-bitshuffle": ("lz4", 5, hdf5plugin.Blosc.BITSHUFFLE),
    "blosc-zstd": ("zstd", 3, hdf5plugin.Blosc.SHUFFLE),
    "blosc-zstd-bitshuffle": ("zstd", 3, hdf5plugin.Blosc.BITSHUFFLE),
}
COMPRESSIONS = ("none", "lzf", "gzip", *BLOSC_CODECS)
# `--compression auto` (the build default): per modality, chosen by delivered samples/s per
# loader worker and bytes read per sample on the realistic synthetic cohort
# (benchmarks/compression_bench.py, docs/BENCHMARKS.md "Compression").
# Chosen per storage layout (the modality table says which a modality uses).
DEFAULT_COMPRESSION_BY_STORAGE: dict[str, str] = {"volume": "none", "frames": "blosc-lz4"}


def default_compression(modality: str) -> str:
    return DEFAULT_COMPRESSION_BY_STORAGE[modality_table.get(modality).storage]


DEFAULT_COMPRESSION: dict[str, str] = {  # per modality registered at import (help text, benchmarks)
    m.name: DEFAULT_COMPRESSION_BY_STORAGE[m.storage] for m in modality_table.all()
}
# Blosc decoder threads per reading process. Loader workers are processes, one core each, so 1
# (benchmarks/compression_bench.py measures 1 and 2: docs/BENCHMARKS.md "The loader at memory
# speed"); `set_decode_threads` changes it for the process (the benchmarks do).
DECODE_THREADS = 1


def set_decode_threads(n: int) -> None:
    global DECODE_THREADS
    if n < 1:
        raise ValueError(f"decode threads must be >= 1, got {n}")
    DECODE_THREADS = int(n)
    blosc.set_nthreads(DECODE_THREADS)


# Per-chunk digest of v2: xxh3-64, seed 0, over the chunk's bytes as stored in the file.
DIGEST_SEED = 0
DIGEST_SUFFIX = "_xxh3"
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


# Dataset and attribute names inside a shard file, per modality from its storage layout:
# volume -> NAME (subjects x D x H x W, one chunk per subject) and NAME_subjects;
# frames -> NAME_frames (all subjects' frames x D x H x W), NAME_subjects and NAME_offsets.
def dataset_name(modality: str) -> str:
    m = modality_table.get(modality)
    return f"{m.name}_frames" if m.storage == "frames" else m.name


def ids_name(modality: str) -> str:
    return f"{modality_table.get(modality).name}_subjects"


def offsets_name(modality: str) -> str:
    return f"{modality_table.get(modality).name}_offsets"


# The built-in modalities' id tables are in every shard, held or not (formats v1 and v2 always
# wrote them); a registered modality's tables are written when the shard holds it, so a shard's
# bytes never depend on which plugins were loaded.
ALWAYS_TABLES = (modality_table.T1.name, modality_table.RSFMRI.name)
DS_T1 = dataset_name(modality_table.T1.name)
DS_T1_SUBJECTS = ids_name(modality_table.T1.name)
DS_RS_FRAMES = dataset_name(modality_table.RSFMRI.name)
DS_RS_SUBJECTS = ids_name(modality_table.RSFMRI.name)
DS_RS_OFFSETS = offsets_name(modality_table.RSFMRI.name)
ATTR_META = "meta_json"
# A half-finished `umbrella-pack upgrade` keeps its complete new dataset here until it is moved.
UPGRADE_DIR = ".upgrade"


class ShardError(Exception):
    """A shard is missing, corrupt or inconsistent with the index; the message names the file."""


class ShardCorruptError(ShardError):
    """A chunk's stored bytes no longer match their checksum; names file, dataset, chunk, subject."""


def chunk_digest(data: Any) -> int:
    """The v2 per-chunk checksum: xxh3-64 (seed 0) of the stored chunk bytes (docs/FORMAT.md)."""
    return xxhash.xxh3_64_intdigest(data, DIGEST_SEED)


def resolve_compression(compression: str | dict[str, str], modalities: Iterable[str]) -> dict:
    """Compression per modality: ``auto`` -> DEFAULT_COMPRESSION, a name -> that for all."""
    if isinstance(compression, dict):
        out = {m: compression[m] for m in modalities}
    elif compression == "auto":
        out = {m: default_compression(m) for m in modalities}
    else:
        out = {m: compression for m in modalities}
    for name in out.values():
        if name not in COMPRESSIONS:
            raise ValueError(f"unknown compression {name!r}; choose one of auto, {COMPRESSIONS}")
    return out


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


def _compression_kwargs(compression: str) -> dict[str, Any]:
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
        format_version: int = FORMAT_VERSION,
    ) -> None:
        if format_version not in READ_VERSIONS:
            raise ValueError(f"format version {format_version}: writes {READ_VERSIONS}")
        self.format_version = format_version
        self.out_dir = Path(out_dir)
        self.shard = shard
        self.final = self.out_dir / shard_name(shard)
        self.tmp = self.out_dir / f".{shard_name(shard)}.tmp{os.getpid()}"
        self.job = job
        self.preprocessing = preprocessing
        self.shapes = {m: tuple(int(x) for x in s) for m, s in shapes.items()}
        self.compressions = resolve_compression(compression, self.shapes)
        self.compression = compression if isinstance(compression, str) else "per-modality"
        # v1 checks chunks with HDF5's fletcher32; v2 stores xxh3 digests of its own (on close).
        fletcher = format_version == 1
        self._subjects: list[dict[str, Any]] = []
        self._rejections: list[dict[str, str]] = []
        unknown = [m for m in self.shapes if not modality_table.is_known(m)]
        if unknown:
            raise ValueError(f"unknown modality {unknown}; known: {modality_table.names()}")
        # Id tables (and offsets for frames) per modality, in the table's order (see ALWAYS_TABLES).
        tabled = modality_table.ordered({*ALWAYS_TABLES, *self.shapes})
        self._ids: dict[str, list[str]] = {m: [] for m in tabled}
        self._offsets: dict[str, list[int]] = {
            m: [0] for m in tabled if modality_table.get(m).storage == "frames"
        }
        self._f = h5py.File(self.tmp, "w", track_order=False)
        self._data: dict[str, h5py.Dataset] = {}
        for m in modality_table.ordered(self.shapes):
            d, h, w = self.shapes[m]
            rows = FRAMES_PER_CHUNK if modality_table.get(m).storage == "frames" else 1
            self._data[m] = self._f.create_dataset(
                dataset_name(m),
                shape=(0, d, h, w),
                maxshape=(None, d, h, w),
                dtype=DTYPE,
                chunks=(rows, d, h, w),
                fletcher32=fletcher,
                track_times=False,
                **_compression_kwargs(self.compressions[m]),
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
            if modality_table.get(modality).storage == "volume":
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
        if self.format_version >= 2:
            self._f.flush()  # chunks leave HDF5's cache: their stored bytes are final
            for ds in self._data.values():
                if ds is not None:
                    self._f.create_dataset(
                        ds.name.lstrip("/") + DIGEST_SUFFIX,
                        data=_stored_digests(ds),
                        dtype="<u8",
                        track_times=False,
                    )
        meta = {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
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
        record = _record_for(self.tmp, meta, self.final.name)
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


def _n_chunks(ds: h5py.Dataset) -> int:
    step = ds.chunks[0]
    return (ds.shape[0] + step - 1) // step


def _slabs(ds: h5py.Dataset) -> int:
    """Digests per chunk: one per row (frame) when chunks are stored uncompressed, so a window
    is read and checked frame by frame without reading the rest of its edge chunks; else one."""
    return int(ds.chunks[0]) if ds.id.get_create_plist().get_nfilters() == 0 else 1


def slab_digests(data: Any, slabs: int) -> list[int]:
    """The v2 digests of one chunk: its stored bytes cut into ``slabs`` equal pieces, each hashed."""
    view = memoryview(data).cast("B")
    n = view.nbytes // slabs
    if n * slabs != view.nbytes:
        return [-1] * slabs  # a stored size that cannot be the writer's: never matches
    return [chunk_digest(view[j * n : (j + 1) * n]) for j in range(slabs)]


def _stored_digests(ds: h5py.Dataset) -> np.ndarray:
    """The v2 digests of ``ds``: (chunks, slabs) xxh3-64 over the chunks' stored bytes."""
    step = ds.chunks[0]
    zeros = (0,) * (ds.ndim - 1)
    slabs = _slabs(ds)
    out = np.empty((_n_chunks(ds), slabs), dtype="<u8")
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
    the format, so a kept shard is one the current run would write again; every chunk is
    checked (v2: its xxh3 digest; v1: read through fletcher32).
    """
    if not path.is_file():
        return None
    try:
        meta = read_shard_meta(path)
        if meta.get("job") != job or meta.get("format_version") != FORMAT_VERSION:
            return None
        if chunk_problems(path, int(meta["format_version"])):
            return None
    except (ShardError, OSError):
        return None
    return _record_for(path, meta, path.name)


def _ids(ds: h5py.Dataset) -> list[str]:
    return [x.decode() if isinstance(x, bytes) else str(x) for x in ds[()]]


def _chunk_subjects(f: h5py.File, name: str, k: int, step: int) -> str:
    """Who owns chunk ``k`` of ``name`` (for the message naming a damaged chunk)."""
    try:
        m = next(m for m in modality_table.names() if dataset_name(m) == name)
        if modality_table.get(m).storage == "volume":
            return f"subject {_ids(f[ids_name(m)])[k]} {m}"
        ids, offsets = _ids(f[ids_name(m)]), f[offsets_name(m)][()]
        lo, hi = k * step, (k + 1) * step
        parts = []
        for i, sid in enumerate(ids):
            a, b = int(offsets[i]), int(offsets[i + 1])
            if a < hi and b > lo:
                parts.append(f"{sid} frames {max(a, lo) - a}..{min(b, hi) - a}")
        return "subject " + ", ".join(parts) + f" {m}" if parts else "no subject"
    except (OSError, KeyError, ValueError, IndexError, StopIteration):
        return "subject unknown (the id tables are unreadable)"


def chunk_problems(path: Path, version: int) -> list[str]:
    """Every image chunk of one shard checked; one problem per damaged chunk, naming its subject.

    v2 hashes each chunk's stored bytes against its digest (no decoding: memory speed); v1 reads
    each chunk through HDF5, whose fletcher32 filter fails on damage.
    """
    problems: list[str] = []
    try:
        with h5py.File(path, "r") as f:
            for name in map(dataset_name, modality_table.names()):
                if name not in f:
                    continue
                ds = f[name]
                step = ds.chunks[0] if ds.chunks else 1
                zeros = (0,) * (ds.ndim - 1)
                digests = f[name + DIGEST_SUFFIX][()] if version >= 2 else None
                if digests is not None and digests.shape != (_n_chunks(ds), _slabs(ds)):
                    problems.append(
                        f"{path}: {name}: digests {digests.shape}, {_n_chunks(ds)} chunks"
                    )
                    continue
                for k in range(_n_chunks(ds)):
                    try:
                        if digests is not None:
                            _, data = ds.id.read_direct_chunk((k * step, *zeros))
                            bad = slab_digests(data, digests.shape[1]) != digests[k].tolist()
                            how = "xxh3 mismatch"
                        else:
                            ds[k * step : (k + 1) * step]
                            bad, how = False, ""
                    except OSError as exc:
                        bad, how = True, f"unreadable: {exc}"
                        if "filter returned failure" in str(exc):
                            how = "fletcher32 checksum failed"
                    if bad:
                        who = _chunk_subjects(f, name, k, step)
                        problems.append(f"{path}: {CORRUPT} ({how} in {name} chunk {k}, {who})")
    except (OSError, KeyError, ValueError) as exc:
        problems.append(f"{path}: unreadable ({exc})")
    return problems


def build_index(
    records: Iterable[ShardRecord],
    *,
    shapes: dict[str, tuple[int, ...]],
    preprocessing: dict[str, Any],
    compression: str,
    subjects_per_shard: int,
    compressions: dict[str, str] | None = None,
    format_version: int = FORMAT_VERSION,
) -> dict[str, Any]:
    """Index content: deterministic (no timestamps, no host names) so its hash is a fingerprint."""
    records = sorted(records, key=lambda r: r.shard)
    subjects = [s for r in records for s in sorted(r.subjects, key=lambda s: s["position"])]
    present = [m for m in modality_table.names() if any(m in s["modalities"] for s in subjects)]
    return {
        "format": FORMAT_NAME,
        "format_version": format_version,
        "tool_version": __version__,
        "dtype": "float16",
        "compression": compression,
        "compressions": compressions or resolve_compression(compression, present),
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


class _ChunkReader:
    """v2 reads of one image dataset of one open shard: direct chunk read, digest, decode.

    The chunk table (file offset, stored size, filter mask per chunk) is read from HDF5 once
    when the shard opens; after that a chunk is one ``preadv`` of its stored bytes from a plain
    file descriptor (what ``read_direct_chunk`` does, without HDF5's per-call overhead, which
    measured about a third of a T1 read). Every chunk is checked against its stored xxh3-64
    before it is decoded, so damaged bytes never reach a decompressor. Uncompressed chunks land
    straight in the caller's array (one copy, as a raw read makes); Blosc and gzip chunks are
    decoded here, straight into the caller's array where a whole chunk is wanted; lzf (no
    decoder outside HDF5) is read again through HDF5's filter after its stored bytes checked out.
    """

    def __init__(self, ds: h5py.Dataset, digests: np.ndarray, path: Path) -> None:
        self.ds = ds
        self.digests = digests
        self.path = path
        self.step = int(ds.chunks[0])
        self.frame_nbytes = int(np.prod(ds.shape[1:])) * ds.dtype.itemsize
        self.chunk_nbytes = self.step * self.frame_nbytes
        n = _n_chunks(ds)
        self.offsets = np.full(n, -1, dtype=np.int64)
        self.sizes = np.zeros(n, dtype=np.int64)
        self.masks = np.zeros(n, dtype=np.int64)

        def visit(info: Any) -> None:
            k = info.chunk_offset[0] // self.step
            if 0 <= k < n:
                self.offsets[k], self.sizes[k] = info.byte_offset, info.size
                self.masks[k] = info.filter_mask

        ds.id.chunk_iter(visit)
        # Stored chunk upper bound: the decoded size (HDF5 stores a chunk unfiltered when the
        # filter does not shrink it) plus a codec header.
        self.raw_cap = max(self.chunk_nbytes + 4096, int(self.sizes.max(initial=0)))
        filters = ds.id.get_create_plist().get_nfilters()
        self.codec = _codec_of(ds) if filters else "none"
        if self.codec == "blosc" and blosc.nthreads != DECODE_THREADS:
            # Loader workers are processes, one core each: decoder threads would oversubscribe.
            blosc.set_nthreads(DECODE_THREADS)
        self.fd = os.open(path, os.O_RDONLY)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    __del__ = close  # a dataset dropped without close() gives its descriptors back

    def _pread(self, k: int, buf: np.ndarray, start: int, what: str) -> None:
        """Stored bytes [start, start + buf.nbytes) of chunk ``k`` into ``buf``."""
        try:
            got = os.preadv(self.fd, [buf], int(self.offsets[k]) + start)
        except OSError as exc:
            raise ShardError(f"{self.path}: cannot read {self.ds.name} chunk {k} ({exc})") from exc
        if got != buf.nbytes:
            raise ShardError(f"{self.path}: {self.ds.name} chunk {k}: file ends early ({what})")

    def _corrupt(self, k: int, what: str) -> ShardCorruptError:
        return ShardCorruptError(
            f"{self.path}: {CORRUPT} (xxh3 mismatch in {self.ds.name.lstrip('/')} chunk {k}, {what})"
        )

    def _raw(self, k: int, buf: np.ndarray, what: str) -> np.ndarray:
        """The stored bytes of chunk ``k`` read into ``buf`` and checked against its digests."""
        size = int(self.sizes[k])
        if self.offsets[k] < 0 or size > buf.nbytes:
            raise ShardError(f"{self.path}: {self.ds.name} chunk {k} missing or {size} bytes")
        data = buf[:size]
        self._pread(k, data, 0, what)
        slabs = self.digests.shape[1]
        if slabs == 1:
            ok = chunk_digest(data) == int(self.digests[k, 0])
        else:
            ok = slab_digests(data, slabs) == self.digests[k].tolist()
        if not ok:
            raise self._corrupt(k, what)
        return data

    def _rows_direct(self, k: int, lo: int, hi: int, dest: np.ndarray, what: str) -> None:
        """Uncompressed chunk ``k``: only its rows [lo, hi) (dataset rows) read, straight into
        ``dest``, each checked against its own digest: an edge chunk costs no extra bytes."""
        if self.sizes[k] != self.chunk_nbytes or self.offsets[k] < 0:
            raise ShardError(f"{self.path}: {self.ds.name} chunk {k}: {self.sizes[k]} bytes")
        j0 = lo - k * self.step
        self._pread(k, dest, j0 * self.frame_nbytes, what)
        fb = self.frame_nbytes
        for j in range(hi - lo):
            if chunk_digest(dest[j * fb : (j + 1) * fb]) != int(self.digests[k, j0 + j]):
                raise self._corrupt(k, what)

    def _decode(self, k: int, data: np.ndarray, dest: np.ndarray) -> None:
        """Decode verified chunk ``k`` into ``dest`` (uint8, exactly the chunk's decoded size)."""
        if self.codec == "none" or self.masks[k] != 0:  # stored unfiltered
            if data.nbytes != dest.nbytes:
                raise ShardError(f"{self.path}: {self.ds.name} chunk {k}: {data.nbytes} bytes")
            if data.__array_interface__["data"][0] != dest.__array_interface__["data"][0]:
                dest[:] = data
            return
        if self.codec == "blosc":
            n = int.from_bytes(data[4:8].tobytes(), "little")  # Blosc1 header: decoded size
            addr = dest.__array_interface__["data"][0]
            if data.nbytes < 16 or n != dest.nbytes or blosc.decompress_ptr(data, addr) != n:
                raise ShardError(f"{self.path}: {self.ds.name} chunk {k}: decodes to {n} bytes")
        elif self.codec == "gzip":
            dest[:] = np.frombuffer(zlib.decompress(data), np.uint8)
        else:  # lzf: decoded by HDF5's filter, from the bytes just checked
            tmp = np.empty((self.step, *self.ds.shape[1:]), self.ds.dtype)
            sel = np.s_[k * self.step : min((k + 1) * self.step, self.ds.shape[0])]
            self.ds.read_direct(tmp, sel, np.s_[: sel.stop - sel.start])
            dest[:] = tmp.reshape(-1).view(np.uint8)

    def read_chunk(self, k: int, dest: np.ndarray, scratch: np.ndarray, what: str) -> None:
        """A whole chunk (T1: one volume) into ``dest`` (uint8 view of the caller's array)."""
        direct = self.codec == "none" and self.masks[k] == 0
        data = self._raw(k, dest if direct else scratch, what)
        self._decode(k, data, dest)

    def read_rows(
        self,
        first: int,
        out: np.ndarray,
        scratch: np.ndarray,
        subject: str,
        frame0: int,
        modality: str = modality_table.RSFMRI.name,
    ) -> None:
        """Rows [first, first + len(out)) into ``out``, chunk by chunk; row ``first`` is frame
        ``frame0`` of ``subject`` (for the message naming a damaged chunk)."""
        n = out.shape[0]
        flat = out.reshape(-1).view(np.uint8)
        raw = scratch[: self.raw_cap]
        decoded = scratch[self.raw_cap : self.raw_cap + self.chunk_nbytes]
        for k in range(first // self.step, (first + n - 1) // self.step + 1):
            lo, hi = max(first, k * self.step), min(first + n, (k + 1) * self.step)
            what = (
                f"subject {subject} {modality} frames {frame0 + lo - first}..{frame0 + hi - first}"
            )
            dest = flat[(lo - first) * self.frame_nbytes : (hi - first) * self.frame_nbytes]
            if self.digests.shape[1] > 1:  # uncompressed: just the rows wanted
                self._rows_direct(k, lo, hi, dest, what)
            elif lo == k * self.step and hi == (k + 1) * self.step:
                self.read_chunk(k, dest, raw, what)
            else:
                self._decode(k, self._raw(k, raw, what), decoded)
                a = (lo - k * self.step) * self.frame_nbytes
                dest[:] = decoded[a : a + dest.nbytes]


def _codec_of(ds: h5py.Dataset) -> str:
    """The decoder a v2 chunk needs, from the dataset's filter pipeline."""
    plist = ds.id.get_create_plist()
    ids = {plist.get_filter(i)[0] for i in range(plist.get_nfilters())}
    if 32001 in ids:
        return "blosc"
    if h5py.h5z.FILTER_DEFLATE in ids:
        return "gzip"
    if 32000 in ids:
        return "lzf"
    raise ShardError(f"{ds.file.filename}: {ds.name} has an unknown filter pipeline {sorted(ids)}")


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
        if self._index.get("format_version") not in READ_VERSIONS:
            raise ShardError(
                f"{index_path}: format version {self._index.get('format_version')} "
                f"(this reader reads {', '.join(map(str, READ_VERSIONS))})"
            )
        self.format_version = int(self._index["format_version"])
        self._fingerprint = hashlib.sha256(raw).hexdigest()
        self._by_id = {s["id"]: s for s in self._index["subjects"]}
        self._shard_files = {s["shard"]: s["file"] for s in self._index["shards"]}
        self._pid = os.getpid()
        self._files: dict[int, h5py.File] = {}
        self._chunked: dict[tuple[int, str], _ChunkReader] = {}
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

    def _read_v1(self, shard: int, name: str, sel: Any, out: np.ndarray, what: str) -> np.ndarray:
        """v1: read ``sel`` straight into ``out`` (fletcher32 verified by HDF5)."""
        try:
            self._file(shard)[name].read_direct(out, sel)
            return out
        except ShardError:
            raise
        except (OSError, KeyError, ValueError) as exc:
            path = self._shard_path(shard)
            if "filter returned failure" in str(exc):  # fletcher32: the chunk's bytes changed
                raise ShardCorruptError(
                    f"{path}: {CORRUPT} (fletcher32 checksum failed reading {what})"
                ) from exc
            raise ShardError(f"{path}: cannot read {name} ({exc})") from exc

    def _reader(self, shard: int, name: str) -> _ChunkReader:
        self._own_handles()
        key = (shard, name)
        r = self._chunked.get(key)
        if r is None:
            f = self._file(shard)
            try:
                r = _ChunkReader(f[name], f[name + DIGEST_SUFFIX][()], self._shard_path(shard))
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
        if modality_table.get(modality).storage == "volume":
            row = int(rec["row"])
            name = dataset_name(modality)
            what = f"subject {subject} {modality} (chunk {row})"
            out = self._out(out, self.shape(modality), what)
            if self.format_version == 1:
                return self._read_v1(shard, name, np.s_[row], out, what)
            r = self._reader(shard, name)
            scratch = self._scratch_for(name, r.raw_cap)
            r.read_chunk(
                row, out.reshape(-1).view(np.uint8), scratch, f"subject {subject} {modality}"
            )
            return out
        if out is not None:
            raise ValueError(f"read(out=...) reads volumes; use read_window for {modality}")
        return self.read_window(subject, modality, 0, rec["frames"])

    def read_window(
        self, subject: str, modality: str, start: int, length: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Frames [start, start+length) as (D,H,W,length) float16 (a transposed view, no copy).

        The frames are stored time-first and read that way: ``out``, if given, is a C-contiguous
        float16 (length,D,H,W) array they are read and decoded straight into (the loader's batch
        slot); the (D,H,W,length) view of it is returned."""
        if modality not in modality_table.series_names():
            series = ", ".join(modality_table.series_names())
            raise KeyError(f"read_window reads {series}, not {modality!r}")
        rec = self._modality_entry(subject, modality)
        if start < 0 or length <= 0 or start + length > rec["frames"]:
            raise IndexError(
                f"{subject}: window [{start}, {start + length}) outside 0..{rec['frames']} frames"
            )
        off = rec["offset"] + start
        shard = self._entry(subject)["shard"]
        shape = (length, *self.shape(modality))
        name = dataset_name(modality)
        out = self._out(out, shape, f"subject {subject} {modality} window")
        if self.format_version == 1:
            first, last = off // FRAMES_PER_CHUNK, (off + length - 1) // FRAMES_PER_CHUNK
            what = f"subject {subject} {modality} frames {start}..{start + length} (chunks {first}..{last})"
            self._read_v1(shard, name, np.s_[off : off + length], out, what)
        else:
            r = self._reader(shard, name)
            scratch = self._scratch_for(name, r.raw_cap + r.chunk_nbytes)
            r.read_rows(off, out, scratch, subject, start, modality)
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
            # Localise the damage: which chunk, whose data (none: metadata or padding changed).
            problems.extend(chunk_problems(spath, ds.format_version))
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
            # Id tables of the built-ins (always written) and of every modality the index holds.
            held = modality_table.ordered({*ALWAYS_TABLES, *idx["shapes"]})
            ids = {m: _ids(f[ids_name(m)]) for m in held}
            offsets = {m: f[offsets_name(m)][()] for m in held if modality_table.get(m).is_series}
            for m in modality_table.names():
                name = dataset_name(m)
                if m in idx["shapes"] and name in f:
                    got = tuple(f[name].shape[1:])
                    if got != tuple(idx["shapes"][m]):
                        problems.append(f"{spath}: {name} grid {got} != {idx['shapes'][m]}")
                    if f[name].dtype != DTYPE:
                        problems.append(f"{spath}: {name} dtype {f[name].dtype}")
            for m in held:
                name = dataset_name(m)
                n = f[name].shape[0] if name in f else 0
                if m not in offsets and n != len(ids[m]):
                    problems.append(f"{spath}: {n} {m} rows but {len(ids[m])} {m} subject ids")
                if m in offsets and int(offsets[m][-1]) != n:
                    problems.append(f"{spath}: {m} offsets end at {offsets[m][-1]}, frames {n}")
            for s in subjects:
                for m in held:
                    rec = s["modalities"].get(m)
                    if rec is None:
                        continue
                    if m not in offsets:
                        if rec["row"] >= len(ids[m]) or ids[m][rec["row"]] != s["id"]:
                            problems.append(
                                f"{spath}: {m} row {rec['row']} is not subject {s['id']}"
                            )
                        continue
                    if s["id"] not in ids[m]:
                        problems.append(f"{spath}: subject {s['id']} has no {m} frames")
                        break
                    k = ids[m].index(s["id"])
                    o = offsets[m]
                    if (int(o[k]), int(o[k + 1] - o[k])) != (rec["offset"], rec["frames"]):
                        problems.append(f"{spath}: {m} offsets of {s['id']} disagree with index")
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
            if modality_table.get(m).is_series:
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
        "compressions": idx.get("compressions") or resolve_compression(idx["compression"], []),
        "format_version": ds.format_version,
        "shards": len(idx["shards"]),
        "bytes_on_disk": disk,
        "bytes_uncompressed": raw,
        "compression_ratio": (raw / disk) if disk else None,
        "rejections": idx["num_rejections"],
        "fingerprint": ds.fingerprint,
    }


def upgrade(path: str | os.PathLike[str], compression: str | None = None) -> dict[str, Any]:
    """Convert a dataset to the current format (v1 -> v2), optionally recompressing.

    Atomic at the index: the complete new dataset (every shard and its index) is written and
    fsynced under ``DIR/.upgrade`` first; only then are the shards moved over the old ones and
    the index last. A crash before the new index exists leaves the old dataset untouched (the
    next run starts over); a crash after it leaves a roll-forward that the next run finishes
    (``check()`` refuses to train meanwhile). Every old chunk is checked (sha256 of each shard
    against the index, the chunk checksums while reading), so damage is never carried over.
    """
    root = Path(path)
    stage = root / UPGRADE_DIR
    if (stage / INDEX_NAME).is_file():
        moved = _roll_forward(root, stage)
        return {"path": str(root), "shards": moved, "resumed": True}
    ds = open_dataset(root)
    idx = ds.index
    present = list(idx["modalities"])
    if compression is not None:
        try:
            target = resolve_compression(compression, present)
        except ValueError as exc:
            raise ShardError(f"{root}: {exc}") from exc
    else:
        target = dict(idx.get("compressions") or resolve_compression(idx["compression"], present))
    if ds.format_version == FORMAT_VERSION and target == idx.get("compressions"):
        return {"path": str(root), "shards": 0, "resumed": False}
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    records = []
    for rec in idx["shards"]:
        spath = root / rec["file"]
        if not spath.is_file():
            raise ShardError(f"{spath}: shard missing; restore it before upgrading")
        if sha256_file(spath) != rec["sha256"]:
            raise ShardCorruptError(f"{spath}: {CORRUPT} (sha256 mismatch); nothing upgraded")
        records.append(_upgrade_shard(ds, spath, stage, target, compression or idx["compression"]))
    new_index = build_index(
        records,
        shapes={m: tuple(idx["shapes"][m]) for m in present},
        preprocessing=idx["preprocessing"],
        compression=compression or idx["compression"],
        subjects_per_shard=int(idx["subjects_per_shard"]),
        compressions=target,
    )
    ds.close()
    write_index(stage, new_index)  # the commit point
    moved = _roll_forward(root, stage)
    return {"path": str(root), "shards": moved, "resumed": False}


def _upgrade_shard(
    ds: ShardDataset, spath: Path, stage: Path, target: dict, label: str
) -> ShardRecord:
    """One shard rewritten subject by subject (a series at a time in memory, never a shard).

    The shard's compression is recorded under its option name (``label``) when that is what it
    means, so an upgraded shard is byte-identical to one packed directly with that option.
    """
    meta = read_shard_meta(spath)
    shapes = {m: tuple(v) for m, v in meta["shapes"].items()}
    comp: str | dict[str, str] = {m: target.get(m, default_compression(m)) for m in shapes}
    if label in ("auto", *COMPRESSIONS) and resolve_compression(label, shapes) == comp:
        comp = label
    writer = ShardWriter(
        stage, int(meta["shard"]), shapes, comp, meta["preprocessing"], meta["job"]
    )
    try:
        for entry in meta["subjects"]:
            volumes = {}
            for m in entry["modalities"]:
                arr = ds.read(entry["id"], m)  # checked: fletcher32 (v1) or xxh3 (v2)
                series = modality_table.get(m).is_series
                volumes[m] = np.ascontiguousarray(np.moveaxis(arr, -1, 0)) if series else arr
            writer.add_subject(
                entry["id"], entry["position"], entry["phenotypes"], volumes, entry["modalities"]
            )
        for r in meta["rejections"]:
            writer.add_rejection(r["subject_id"], r["modality"], r["path"], r["reason"])
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def _roll_forward(root: Path, stage: Path) -> int:
    """Move the staged shards over the old ones, then the staged index; drop the stage."""
    moved = 0
    for p in sorted(stage.glob("shard-*.h5")):
        os.replace(p, root / p.name)
        moved += 1
    fsync_dir(root)
    os.replace(stage / INDEX_NAME, root / INDEX_NAME)
    fsync_dir(root)
    shutil.rmtree(stage, ignore_errors=True)
    return moved
