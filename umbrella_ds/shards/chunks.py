"""v2 chunks, read and checked: the hot path's chunk reader and the at-rest check of a shard.

Every chunk's stored bytes are hashed against their xxh3-64 digests before anything decodes
them (docs/FORMAT.md "Per-chunk checksum (v2), exactly").
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any

import blosc
import h5py
import numpy as np

from umbrella_ds import modality as modality_table
from umbrella_ds.shards.format import (
    CORRUPT,
    DIGEST_SUFFIX,
    ShardCorruptError,
    ShardError,
    chunk_digest,
    chunk_owner,
    dataset_name,
    n_chunks,
    slab_digests,
    slabs_per_chunk,
)

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


class ChunkReader:
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
        n = n_chunks(ds)
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
        self.codec = codec_of(ds) if filters else "none"
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
        """A whole chunk (a volume) into ``dest`` (uint8 view of the caller's array)."""
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


def codec_of(ds: h5py.Dataset) -> str:
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


def chunk_problems(path: Path) -> list[str]:
    """Every image chunk of one v2 shard checked: its stored bytes hashed against its digests
    (no decoding: memory speed); one problem per damaged chunk, naming its subject."""
    problems: list[str] = []
    try:
        with h5py.File(path, "r") as f:
            for name in map(dataset_name, modality_table.names()):
                if name not in f:
                    continue
                ds = f[name]
                step = ds.chunks[0]
                zeros = (0,) * (ds.ndim - 1)
                digests = f[name + DIGEST_SUFFIX][()]
                if digests.shape != (n_chunks(ds), slabs_per_chunk(ds)):
                    problems.append(
                        f"{path}: {name}: digests {digests.shape}, {n_chunks(ds)} chunks"
                    )
                    continue
                for k in range(n_chunks(ds)):
                    try:
                        _, data = ds.id.read_direct_chunk((k * step, *zeros))
                        bad = slab_digests(data, digests.shape[1]) != digests[k].tolist()
                        how = "xxh3 mismatch"
                    except OSError as exc:
                        bad, how = True, f"unreadable: {exc}"
                    if bad:
                        who = chunk_owner(f, name, k, step)
                        problems.append(f"{path}: {CORRUPT} ({how} in {name} chunk {k}, {who})")
    except (OSError, KeyError, ValueError) as exc:
        problems.append(f"{path}: unreadable ({exc})")
    return problems
