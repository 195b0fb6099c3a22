"""``umbrella-pack verify`` and ``info``: the full re-check of a dataset, and its summary.

Both open v2 and v1 datasets (v1 through shards/v1.py), so a user can check and describe an old
dataset before upgrading it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from umbrella_ds import modality as modality_table
from umbrella_ds.shards.chunks import chunk_problems
from umbrella_ds.shards.format import (
    ALWAYS_TABLES,
    CORRUPT,
    DTYPE,
    FORMAT_VERSION,
    INDEX_NAME,
    ShardError,
    dataset_name,
    ids_name,
    offsets_name,
    read_ids,
    resolve_compression,
    sha256_file,
)
from umbrella_ds.shards.v1 import chunk_problems_v1, open_any


def verify(path: str | os.PathLike[str]) -> list[str]:
    """Full re-check: every shard's sha256, size, datasets and shapes against the index.

    Returns the list of problems (empty when the dataset is sound); each names its file.
    """
    root = Path(path)
    try:
        ds = open_any(root)
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
            v2 = ds.format_version == FORMAT_VERSION
            problems.extend(chunk_problems(spath) if v2 else chunk_problems_v1(spath))
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
            ids = {m: read_ids(f[ids_name(m)]) for m in held}
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
    ds = open_any(path)
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
