"""THE shard format (v2): names, writer, index, reader, verify/info and upgrade. One source of truth.

A dataset directory holds ``shard-00000.h5`` ... and ``index.json`` (written last). Packing
(the packer, ``umbrella-pack``) writes shards through :class:`ShardWriter` and the index through
:func:`write_index`; training reads through :func:`open_dataset`. The layout is specified in
``docs/FORMAT.md``; the names of files, datasets and attributes live in ``format`` only.

Modules, one concept each:

- ``format``: names, numbers, digests, errors (imported by all the others);
- ``writer``: :class:`ShardWriter` (v2 only) and its full-disk workaround;
- ``index``: ``index.json`` built, written, read; ``--resume``'s :func:`reuse_shard`;
- ``chunks``: the v2 chunk reader and the at-rest chunk check;
- ``reader``: :class:`ShardDataset`, the training reader (v2 only; v1 refused with the
  upgrade command);
- ``v1``: the one v1 reader, for ``upgrade``, ``verify`` and ``info``;
- ``verifier``: :func:`verify` and :func:`info`;
- ``upgrader``: :func:`upgrade` (v1 -> v2, recompression).
"""

from umbrella_ds.shards.chunks import chunk_problems, set_decode_threads
from umbrella_ds.shards.format import (
    ATTR_META,
    BLOSC_CODECS,
    COMPRESSIONS,
    CORRUPT,
    DEFAULT_COMPRESSION,
    DIGEST_SUFFIX,
    DS_RS_FRAMES,
    DS_RS_OFFSETS,
    DS_T1,
    DTYPE,
    FORMAT_NAME,
    FORMAT_VERSION,
    FRAMES_PER_CHUNK,
    INDEX_NAME,
    REJECTED_NAME,
    STAMP_BYTES,
    UPGRADE_DIR,
    ShardCorruptError,
    ShardError,
    UpgradeRequiredError,
    chunk_digest,
    dataset_name,
    default_compression,
    ids_name,
    offsets_name,
    read_shard_meta,
    resolve_compression,
    sha256_file,
    shard_name,
    shard_of,
    stamp_file,
)
from umbrella_ds.shards.index import build_index, reuse_shard, write_index
from umbrella_ds.shards.reader import ShardDataset, open_dataset
from umbrella_ds.shards.upgrader import upgrade
from umbrella_ds.shards.verifier import info, verify
from umbrella_ds.shards.writer import ShardRecord, ShardWriter

__all__ = [
    "ATTR_META",
    "BLOSC_CODECS",
    "COMPRESSIONS",
    "CORRUPT",
    "DEFAULT_COMPRESSION",
    "DIGEST_SUFFIX",
    "DS_RS_FRAMES",
    "DS_RS_OFFSETS",
    "DS_T1",
    "DTYPE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "FRAMES_PER_CHUNK",
    "INDEX_NAME",
    "REJECTED_NAME",
    "STAMP_BYTES",
    "UPGRADE_DIR",
    "ShardCorruptError",
    "ShardDataset",
    "ShardError",
    "ShardRecord",
    "ShardWriter",
    "UpgradeRequiredError",
    "build_index",
    "chunk_digest",
    "chunk_problems",
    "dataset_name",
    "default_compression",
    "ids_name",
    "info",
    "offsets_name",
    "open_dataset",
    "read_shard_meta",
    "resolve_compression",
    "reuse_shard",
    "set_decode_threads",
    "sha256_file",
    "shard_name",
    "shard_of",
    "stamp_file",
    "upgrade",
    "verify",
    "write_index",
]
