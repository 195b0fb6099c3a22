"""A synthetic cohort packed into real shards: ``umbrella-pack synth`` then ``umbrella-pack build``.

The one way the tests make a packed cohort; the session fixture ``packed_cohort``
(tests/conftest.py) calls `pack_cohort` once per distinct `CohortSpec` and hands the same folder
to every test that asks for that spec.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from .training import BIN

Grid = tuple[int, int, int]


def grid(edge: int | Grid) -> Grid:
    """A cube's edge or a whole grid, as a grid."""
    return (edge, edge, edge) if isinstance(edge, int) else tuple(edge)  # type: ignore[return-value]


@dataclass(frozen=True)
class CohortSpec:
    """Everything that decides the cohort's bytes (the build's worker count does not: shard
    bytes are equal for any number of workers)."""

    subjects: int
    seed: int
    size: Grid  # T1's packed grid
    modalities: tuple[str, ...]  # packed modalities; rsfMRI is packed at its synthetic grid
    t1_shape: Grid  # synthetic T1 grid
    frames: int  # synthetic rsfMRI frames
    rsfmri_shape: Grid  # synthetic rsfMRI grid (and its packed grid)


def _run(cmd: list, timeout: float) -> None:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))}: exit {done.returncode}\n{done.stderr}"


def pack_cohort(spec: CohortSpec, root: Path) -> Path:
    """Writes ``root/raw`` (phantoms, manifest, phenotypes, instructions) and ``root/shards``."""
    raw = root / "raw"
    timeout = 120 + spec.subjects  # 400 subjects: about a minute each step on 2 busy cores
    _run(
        [BIN / "umbrella-pack", "synth", "--out", raw, "--subjects", spec.subjects,
         "--seed", spec.seed, "--t1-shape", *spec.t1_shape, "--frames", spec.frames,
         "--rsfmri-shape", *spec.rsfmri_shape],
        timeout,
    )  # fmt: skip
    sizes = ["--t1-size", *spec.size]
    if "rsfMRI" in spec.modalities:
        sizes += ["--rsfmri-size", *spec.rsfmri_shape]
    workers = min(2, -(-spec.subjects // 32))  # one shard each (32 subjects a shard), 2 cores
    _run(
        [BIN / "umbrella-pack", "build", "--manifest", raw / "manifest.csv", "--out",
         root / "shards", "--modalities", *spec.modalities, *sizes, "--workers", workers,
         "--no-progress"],
        timeout,
    )  # fmt: skip
    return root
