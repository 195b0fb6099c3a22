"""Node-local staging: copy a packed dataset's shards to a node-local disk once, read from there.

Why: the sampler reshuffles every epoch, so every node reads every shard every epoch; where the
parallel file system, not the CPU, limits the loader (docs/OPERATIONS.md has the arithmetic), a
copy on each node's NVMe turns those reads into local ones after the first pass.

`data.stage_dir` names the node-local folder. One process per node copies (node-local rank 0;
the others wait at a barrier): each shard to a temporary name, hashed while it is copied and
renamed only when its sha256 equals the index's, then `index.json` last, so a staged dataset
with an index is complete. A staging killed part way resumes: a shard already in place with its
recorded size and stamp is kept, anything else is copied again. A full disk or a digest
mismatch is a one-line error naming the shard. The staged index is the same bytes, so the data
fingerprint (and with it exact resume) does not change.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

from umbrella_ds.errors import UserError
from umbrella_ds.io import atomic_path, fsync_dir
from umbrella_ds.shards import INDEX_NAME, REJECTED_NAME, stamp_file

BLOCK = 8 << 20  # copy block: large enough that Python's per-call cost is noise


class StagingError(UserError):
    """data.stage_dir: a shard could not be staged."""


def staged_path(shards: Path, stage_dir: Path) -> Path:
    """Where ``shards`` is staged: a folder per source dataset (its name and index hash), so two
    datasets staged into one ``stage_dir`` never mix."""
    digest = hashlib.sha256((shards / INDEX_NAME).read_bytes()).hexdigest()[:12]
    return stage_dir / f"{shards.resolve().name}-{digest}"


def _in_place(path: Path, rec: dict[str, Any]) -> bool:
    """A staged shard is kept when its size and stamp are the recorded ones (its sha256 was
    checked when it was copied; every read checks its chunks' digests)."""
    try:
        return path.stat().st_size == rec["bytes"] and stamp_file(path) == rec["stamp"]
    except OSError:
        return False


def _copy_checked(src: Path, dst: Path, rec: dict[str, Any], bar: Any) -> None:
    tmp = dst.with_name(dst.name + ".staging")
    h = hashlib.sha256()
    try:
        with open(src, "rb") as fi, open(tmp, "wb") as fo:
            while block := fi.read(BLOCK):
                h.update(block)
                fo.write(block)
                bar.update(len(block))
            fo.flush()
            os.fsync(fo.fileno())
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise StagingError(
                f"data.stage_dir: {dst.parent} is full staging shard {rec['file']} "
                f"({rec['bytes'] / 1e9:.2f} GB): free space or stage elsewhere"
            ) from None
        raise StagingError(f"data.stage_dir: cannot stage shard {rec['file']} ({exc})") from None
    if h.hexdigest() != rec["sha256"]:
        tmp.unlink(missing_ok=True)
        raise StagingError(
            f"data.stage_dir: shard {rec['file']}: the copy's sha256 {h.hexdigest()[:16]}... is "
            f"not the index's {rec['sha256'][:16]}... (the source {src} or the copy is damaged; "
            "umbrella-pack verify checks the source)"
        )
    os.replace(tmp, dst)


def stage(
    shards: str | os.PathLike[str], stage_dir: str | os.PathLike[str], progress: bool
) -> Path:
    """Copy (or finish copying) ``shards`` under ``stage_dir``; returns the staged dataset."""
    import json

    from tqdm import tqdm

    src = Path(shards)
    try:
        index_bytes = (src / INDEX_NAME).read_bytes()
    except OSError as exc:
        raise StagingError(f"data.shards: cannot read {src / INDEX_NAME} ({exc})") from None
    index = json.loads(index_bytes)
    dst = staged_path(src, Path(stage_dir))
    try:
        dst.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StagingError(f"data.stage_dir: cannot create {dst} ({exc})") from None
    todo = [r for r in index["shards"] if not _in_place(dst / r["file"], r)]
    need = sum(r["bytes"] for r in todo)
    free = shutil.disk_usage(dst).free
    if need > free and todo:
        first = todo[0]["file"]
        raise StagingError(
            f"data.stage_dir: {dst} has {free / 1e9:.2f} GB free, staging needs {need / 1e9:.2f} "
            f"GB more (from shard {first}): free space or stage elsewhere"
        )
    if todo:  # incomplete until every shard is in place again
        (dst / INDEX_NAME).unlink(missing_ok=True)
    with tqdm(
        total=need, unit="B", unit_scale=True, desc="staging shards", disable=not progress
    ) as bar:
        for rec in todo:
            _copy_checked(src / rec["file"], dst / rec["file"], rec, bar)
    if (src / REJECTED_NAME).is_file():
        shutil.copyfile(src / REJECTED_NAME, dst / REJECTED_NAME)
    if not (dst / INDEX_NAME).is_file():
        with atomic_path(dst / INDEX_NAME) as tmp:  # the same bytes: the same data fingerprint
            tmp.write_bytes(index_bytes)
    fsync_dir(dst)
    return dst


def stage_for_node(
    shards: str | os.PathLike[str],
    stage_dir: str | os.PathLike[str],
    local_rank: int,
    progress: bool,
) -> Path:
    """Every rank's staged dataset: node-local rank 0 stages, the others wait for it (a barrier
    of the whole job, so every node's copier has finished before anyone reads)."""
    import torch.distributed as dist

    dst = staged_path(Path(shards), Path(stage_dir))
    if local_rank == 0:
        dst = stage(shards, stage_dir, progress)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if not (dst / INDEX_NAME).is_file():
        raise StagingError(f"data.stage_dir: {dst} has no staged index after its node's copier ran")
    return dst
