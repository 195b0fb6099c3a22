"""The shard format's names and numbers: files, datasets, attributes, codecs, digests, errors.

Everything the writer, the reader, verify and upgrade must agree on lives here, and only here;
the layout is specified in ``docs/FORMAT.md``.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin  # registers the Blosc filter, so blosc shards read anywhere shards is imported
import numpy as np
import xxhash

from umbrella_ds import modality as modality_table
from umbrella_ds.errors import UserError

FORMAT_NAME = "umbrella-shards"
# The version the writer writes and training reads. v1 (HDF5 fletcher32 per chunk, a byte loop
# at about 2.4 GB/s, most of a read's cost) is read only by ``umbrella-pack upgrade`` (and
# verify/info), through shards/v1.py. v2: xxh3-64 of every stored chunk in the shard, checked
# on every read at memory speed (tens of GB/s), chunks read directly and decoded here.
FORMAT_VERSION = 2
V1 = 1
INDEX_NAME = "index.json"
REJECTED_NAME = "rejected.csv"
DTYPE = np.float16
# Series frames per HDF5 chunk: a 24-frame window touches 6-7 chunks, a whole chunk stays
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
# (benchmarks/compression_bench.py, docs/BENCHMARKS.md "Compression"): a volume is stored raw,
# a series (the modality table says which a modality is) with Blosc lz4.
DEFAULT_VOLUME_COMPRESSION = "none"
DEFAULT_SERIES_COMPRESSION = "blosc-lz4"


def default_compression(modality: str) -> str:
    series = modality_table.get(modality).is_series
    return DEFAULT_SERIES_COMPRESSION if series else DEFAULT_VOLUME_COMPRESSION


DEFAULT_COMPRESSION: dict[str, str] = {  # per modality registered at import (help text, benchmarks)
    m.name: default_compression(m.name) for m in modality_table.all()
}

# Per-chunk digest of v2: xxh3-64, seed 0, over the chunk's bytes as stored in the file.
DIGEST_SEED = 0
DIGEST_SUFFIX = "_xxh3"
# The cheap check hashes this much of each end of a shard (small shards: the whole file).
STAMP_BYTES = 1 << 20
# One wording for a damaged shard, whether `umbrella-pack verify` or training's start-up check
# finds it, so the user greps one message and finds one remedy.
CORRUPT = (
    "corrupt: its bytes changed since packing; restore it or re-pack (umbrella-pack build --resume)"
)


# Dataset and attribute names inside a shard file, per modality: a volume modality ->
# NAME (subjects x D x H x W, one chunk per subject) and NAME_subjects; a series ->
# NAME_frames (all subjects' frames x D x H x W), NAME_subjects and NAME_offsets.
def dataset_name(modality: str) -> str:
    m = modality_table.get(modality)
    return f"{m.name}_frames" if m.is_series else m.name


def ids_name(modality: str) -> str:
    return f"{modality_table.get(modality).name}_subjects"


def offsets_name(modality: str) -> str:
    return f"{modality_table.get(modality).name}_offsets"


def rows_per_chunk(modality: str) -> int:
    """HDF5 chunk rows: one volume per chunk, FRAMES_PER_CHUNK frames of a series."""
    return FRAMES_PER_CHUNK if modality_table.get(modality).is_series else 1


# The built-in modalities' id tables are in every shard, held or not (formats v1 and v2 always
# wrote them); a registered modality's tables are written when the shard holds it, so a shard's
# bytes never depend on which plugins were loaded.
ALWAYS_TABLES = (modality_table.T1.name, modality_table.RSFMRI.name)
DS_T1 = dataset_name(modality_table.T1.name)
DS_RS_FRAMES = dataset_name(modality_table.RSFMRI.name)
DS_RS_OFFSETS = offsets_name(modality_table.RSFMRI.name)
ATTR_META = "meta_json"
# A half-finished `umbrella-pack upgrade` keeps its complete new dataset here until it is moved.
UPGRADE_DIR = ".upgrade"


class ShardError(Exception):
    """A shard is missing, corrupt or inconsistent with the index; the message names the file."""


class ShardCorruptError(ShardError):
    """A chunk's stored bytes no longer match their checksum; names file, dataset, chunk, subject."""


class UpgradeRequiredError(UserError):
    """A dataset in an older format opened for reading: one line naming the directory, its
    format version and the ``umbrella-pack upgrade`` command that converts it (once)."""

    def __init__(self, path: Path, version: int) -> None:
        super().__init__(
            f"{path}: shard format v{version}; training reads format v{FORMAT_VERSION} only. "
            f"Convert it once with: {upgrade_command(path)}"
        )


def upgrade_command(path: Path) -> str:
    """The command that converts a dataset to FORMAT_VERSION (`umbrella-pack upgrade`),
    quoted for a shell so it can be pasted as printed."""
    return f"umbrella-pack upgrade {shlex.quote(str(path))}"


def chunk_digest(data: Any) -> int:
    """The v2 per-chunk checksum: xxh3-64 (seed 0) of the stored chunk bytes (docs/FORMAT.md)."""
    return xxhash.xxh3_64_intdigest(data, DIGEST_SEED)


def slab_digests(data: Any, slabs: int) -> list[int]:
    """The v2 digests of one chunk: its stored bytes cut into ``slabs`` equal pieces, each hashed."""
    view = memoryview(data).cast("B")
    n = view.nbytes // slabs
    if n * slabs != view.nbytes:
        return [-1] * slabs  # a stored size that cannot be the writer's: never matches
    return [chunk_digest(view[j * n : (j + 1) * n]) for j in range(slabs)]


def n_chunks(ds: h5py.Dataset) -> int:
    step = ds.chunks[0]
    return (ds.shape[0] + step - 1) // step


def slabs_per_chunk(ds: h5py.Dataset) -> int:
    """Digests per chunk: one per row (frame) when chunks are stored uncompressed, so a window
    is read and checked frame by frame without reading the rest of its edge chunks; else one."""
    return int(ds.chunks[0]) if ds.id.get_create_plist().get_nfilters() == 0 else 1


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
    per-chunk xxh3 digests, checked on every read.
    """
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(STAMP_BYTES))
        if size > STAMP_BYTES:
            f.seek(max(STAMP_BYTES, size - STAMP_BYTES))
            h.update(f.read(STAMP_BYTES))
    return h.hexdigest()


def read_shard_meta(path: Path) -> dict[str, Any]:
    """The self-description stored inside a shard (raises ShardError naming the file)."""
    try:
        with h5py.File(path, "r") as f:
            return json.loads(f.attrs[ATTR_META])
    except (OSError, KeyError, ValueError) as exc:
        raise ShardError(f"{path}: cannot read shard metadata ({exc})") from exc


def read_ids(ds: h5py.Dataset) -> list[str]:
    """A subject id table as Python strings."""
    return [x.decode() if isinstance(x, bytes) else str(x) for x in ds[()]]


def chunk_owner(f: h5py.File, name: str, k: int, step: int) -> str:
    """Who owns chunk ``k`` of ``name`` (for the message naming a damaged chunk)."""
    try:
        m = next(m for m in modality_table.names() if dataset_name(m) == name)
        if not modality_table.get(m).is_series:
            return f"subject {read_ids(f[ids_name(m)])[k]} {m}"
        ids, offsets = read_ids(f[ids_name(m)]), f[offsets_name(m)][()]
        lo, hi = k * step, (k + 1) * step
        parts = []
        for i, sid in enumerate(ids):
            a, b = int(offsets[i]), int(offsets[i + 1])
            if a < hi and b > lo:
                parts.append(f"{sid} frames {max(a, lo) - a}..{min(b, hi) - a}")
        return "subject " + ", ".join(parts) + f" {m}" if parts else "no subject"
    except (OSError, KeyError, ValueError, IndexError, StopIteration):
        return "subject unknown (the id tables are unreadable)"
