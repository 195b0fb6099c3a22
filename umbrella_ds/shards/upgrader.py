"""``umbrella-pack upgrade``: a dataset converted to the current format (v1 -> v2), optionally
recompressed, atomically at the index. v1 is read through shards/v1.py, the only v1 reader.

(Named ``upgrader``, not ``upgrade``, so the package attribute ``shards.upgrade`` is only ever
the function.)"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from umbrella_ds import modality as modality_table
from umbrella_ds.io import fsync_dir
from umbrella_ds.shards.format import (
    COMPRESSIONS,
    CORRUPT,
    FORMAT_VERSION,
    INDEX_NAME,
    UPGRADE_DIR,
    ShardCorruptError,
    ShardError,
    default_compression,
    read_shard_meta,
    resolve_compression,
    sha256_file,
)
from umbrella_ds.shards.index import build_index, write_index
from umbrella_ds.shards.reader import ShardDataset
from umbrella_ds.shards.v1 import open_any
from umbrella_ds.shards.writer import ShardRecord, ShardWriter


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
    ds = open_any(root)
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
