"""``provenance.json``: what produced an output directory, so a number can be traced and redone.

Every output directory (pack, train, eval, export) gets one. It records the command line, the
resolved config, package versions, the git commit of the code when it runs from a checkout, the
hosts and ranks that ran it, and fingerprints of the inputs. Written atomically, so a reader never
sees half a file.

The git lookup must never break a pack or a training run: outside a checkout (an installed
wheel), without ``git``, or when git fails, ``git`` is recorded as ``None``.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import logging
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from umbrella_ds.io import atomic_write_text

log = logging.getLogger(__name__)

PROVENANCE_NAME = "provenance.json"
FORMAT_VERSION = 1
KINDS = ("pack", "train", "eval", "export")
PACKAGES = ("umbrella-ds", "torch", "deepspeed", "transformers", "numpy", "h5py")
GIT_TIMEOUT_S = 10


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed distribution versions (metadata only: importing deepspeed here would be slow)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args],
        capture_output=True,
        text=True,
        timeout=GIT_TIMEOUT_S,
        check=True,
    ).stdout.strip()


def git_state(repo: Path | None = None) -> dict[str, Any] | None:
    """``{"commit", "dirty", "repo"}`` of the checkout the package runs from, else None.

    ``repo`` defaults to the directory that holds the ``umbrella_ds`` package; it must be the top
    of a git work tree (a package installed inside some other repository is not "our" commit).
    ``dirty`` counts modified tracked files only (untracked files do not change what ran).
    """
    repo = Path(repo) if repo is not None else Path(__file__).resolve().parents[1]
    try:
        top = _git(repo, "rev-parse", "--show-toplevel")
        if Path(top).resolve() != repo.resolve():
            return None
        commit = _git(repo, "rev-parse", "HEAD")
        dirty = bool(_git(repo, "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("no git commit recorded for %s: %s", repo, exc)
        return None
    return {"commit": commit, "dirty": dirty, "repo": str(repo)}


def collect(
    *,
    kind: str,
    config: dict[str, Any] | None,
    inputs: dict[str, str],
    extra: dict[str, Any] | None = None,
    ranks: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The provenance record (what :func:`write_provenance` writes)."""
    if kind not in KINDS:
        raise ValueError(f"provenance kind {kind!r}: choose one of {KINDS}")
    host = socket.gethostname()
    return {
        "format": FORMAT_VERSION,
        "kind": kind,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": list(sys.argv),
        "executable": sys.executable,
        "cwd": os.getcwd(),
        "host": host,
        "ranks": ranks if ranks is not None else [{"rank": 0, "host": host, "node": None}],
        "config": config,
        "inputs": dict(inputs),
        "versions": package_versions(),
        "git": git_state(),
        "extra": extra or {},
    }


def write_provenance(
    out_dir: str | os.PathLike[str],
    *,
    kind: str,
    config: dict[str, Any] | None,
    inputs: dict[str, str],
    extra: dict[str, Any] | None = None,
    ranks: list[dict[str, Any]] | None = None,
) -> Path:
    """Write ``out_dir/provenance.json`` atomically and return its path.

    ``inputs`` maps an input's role to its fingerprint (e.g. ``{"manifest": sha256}``); ``ranks``
    lists ``{"rank", "host", "node"}`` of every rank of a distributed job (default: this process).
    Call it from one process only (rank 0).
    """
    record = collect(kind=kind, config=config, inputs=inputs, extra=extra, ranks=ranks)
    path = Path(out_dir) / PROVENANCE_NAME
    atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True, default=str) + "\n")
    return path


def read_provenance(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    return json.loads((Path(out_dir) / PROVENANCE_NAME).read_text())
