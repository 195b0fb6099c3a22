"""Atomic file writes: the only copy of write-to-a-temporary-name, fsync, rename.

Why every output goes through here: a run killed mid-write (preemption, a full disk) must leave
the old file or the new one, never half of one that a resumed run, `umbrella-report` or a user
then reads as whole. The temporary name is hidden and per process (`.NAME.tmpPID`), so ranks or
workers writing side by side never share one; the rename is followed by an fsync of the folder,
so the new name survives a crash of the machine too.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort where a folder cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yields a temporary path beside ``path``; on a clean exit it replaces ``path``, on an
    exception it is removed. ``suffix`` keeps an extension writers look at (``.png``)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{suffix}")
    try:
        yield tmp
        if tmp.exists():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Readers see the old file or the new one, whole."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
