"""``index.json``: built from the shards' records, written last, read first; and ``--resume``'s
test of whether a shard already on disk can be kept."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from umbrella_ds import __version__
from umbrella_ds import modality as modality_table
from umbrella_ds.io import atomic_write_text
from umbrella_ds.shards.chunks import chunk_problems
from umbrella_ds.shards.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    FRAMES_PER_CHUNK,
    INDEX_NAME,
    V1,
    ShardError,
    read_shard_meta,
    resolve_compression,
)
from umbrella_ds.shards.writer import ShardRecord, record_for

# Versions whose index this package can open: FORMAT_VERSION for training, V1 for upgrade.
KNOWN_VERSIONS = (V1, FORMAT_VERSION)


def build_index(
    records: Iterable[ShardRecord],
    *,
    shapes: dict[str, tuple[int, ...]],
    preprocessing: dict[str, Any],
    compression: str,
    subjects_per_shard: int,
    compressions: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Index content: deterministic (no timestamps, no host names) so its hash is a fingerprint."""
    records = sorted(records, key=lambda r: r.shard)
    subjects = [s for r in records for s in sorted(r.subjects, key=lambda s: s["position"])]
    present = [m for m in modality_table.names() if any(m in s["modalities"] for s in subjects)]
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
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


def load_index(root: Path) -> tuple[dict[str, Any], bytes]:
    """(parsed index, its bytes) of a dataset directory in a known format version.

    Raises ShardError naming the index when it is unreadable, not an umbrella-shards index or
    of a version this package does not know; which version a reader accepts is the reader's."""
    index_path = root / INDEX_NAME
    try:
        raw = index_path.read_bytes()
    except OSError as exc:
        raise ShardError(f"{index_path}: cannot read index ({exc})") from exc
    try:
        index = json.loads(raw)
    except ValueError as exc:
        raise ShardError(f"{index_path}: invalid JSON ({exc})") from exc
    if index.get("format") != FORMAT_NAME:
        raise ShardError(f"{index_path}: not an {FORMAT_NAME} index")
    if index.get("format_version") not in KNOWN_VERSIONS:
        raise ShardError(
            f"{index_path}: format version {index.get('format_version')} "
            f"(this reader reads {', '.join(map(str, KNOWN_VERSIONS))})"
        )
    return index, raw


def reuse_shard(path: Path, job: str) -> ShardRecord | None:
    """Record of an existing shard if it was built for exactly this job and reads back intact.

    Used by ``--resume``: the job hash covers the shard's manifest rows, the preprocessing and
    the format, so a kept shard is one the current run would write again; every chunk is
    checked against its xxh3 digests.
    """
    if not path.is_file():
        return None
    try:
        meta = read_shard_meta(path)
        if meta.get("job") != job or meta.get("format_version") != FORMAT_VERSION:
            return None
        if chunk_problems(path):
            return None
    except (ShardError, OSError):
        return None
    return record_for(path, meta, path.name)
