"""Shared test settings (CPU DeepSpeed, cached extension builds, repository paths) and the
fixtures more than one folder uses: the packed-cohort factory (every synthetic cohort a test
trains or reads on), the 48-subject training cohort and one finished 2-rank run.

Session fixtures are built once per session, on first use. A folder's own fixtures live in its
conftest.py; helpers (no fixtures) live in tests/helpers/.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers.cohort import CohortSpec, Grid, grid, pack_cohort
from helpers.training import base_sets, check, run_train

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
CACHE = Path(os.environ.get("UMBRELLA_CACHE", Path.home() / ".cache" / "umbrella-ds"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(CACHE / "torch_extensions"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(CACHE / "inductor"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def venv_bin() -> Path:
    """Directory of the interpreter running the tests (console scripts live beside it)."""
    return Path(sys.executable).parent


@pytest.fixture(scope="session")
def packed_cohort(tmp_path_factory) -> Callable[..., Path]:
    """``packed_cohort(n, seed, size=32, modalities=("T1",), *, t1_shape=48, frames=8,
    rsfmri_shape=16)``: the folder (``raw/``, ``shards/``) of ``n`` synthetic subjects packed with
    T1 at ``size`` (an edge or a grid) and rsfMRI, when packed, at its synthetic grid. Built on the
    first call with these arguments, then the same folder for the rest of the session."""
    built: dict[CohortSpec, Path] = {}

    def get(
        n: int,
        seed: int,
        size: int | Grid = 32,
        modalities: tuple[str, ...] = ("T1",),
        *,
        t1_shape: int | Grid = 48,
        frames: int = 8,
        rsfmri_shape: int | Grid = 16,
    ) -> Path:
        spec = CohortSpec(
            n, seed, grid(size), tuple(modalities), grid(t1_shape), frames, grid(rsfmri_shape)
        )
        if spec not in built:
            root = tmp_path_factory.mktemp(f"cohort-{n}-seed{seed}")
            built[spec] = pack_cohort(spec, root)
        return built[spec]

    return get


@pytest.fixture(scope="session")
def train_data(packed_cohort) -> Path:
    """A small synthetic cohort, T1 packed at 32^3 (48 subjects: 38 train, 10 eval)."""
    return packed_cohort(48, 0)


SHM_SEGMENTS = "/dev/shm/deepspeed_allreduce_buffer_*"  # DeepSpeed's CPU comm op, one per rank


@pytest.fixture(scope="session")
def fp32_run_and_shm(train_data, tmp_path_factory) -> tuple[Path, set[str]]:
    """A finished 2-rank ZeRO-2 fp32 run with a checkpoint every step and eval at the end, and the
    shared-memory segments of DeepSpeed's CPU comm op that appeared while it ran and outlived it
    (test_train_checkpoint.py: there must be none)."""
    out = tmp_path_factory.getbasetemp() / "fp32-run"
    sets = base_sets(
        train_data,
        out,
        **{"train.max_steps": 4, "train.bf16": "false", "checkpoint.every_steps": 1,
           "checkpoint.keep_last": 2, "eval.at_end": "true", "eval.max_new_tokens": 4},
    )  # fmt: skip
    before = set(glob.glob(SHM_SEGMENTS))
    proc = run_train(2, sets, timeout=300)
    check(proc)
    # Only this run's segments (named ..._<addr>_<port>_<rank>): runs of other sessions or test
    # workers may be starting meanwhile.
    port = proc.args[proc.args.index("--master_port") + 1]
    new = set(glob.glob(SHM_SEGMENTS)) - before
    return out, {p for p in new if p.rsplit("_", 2)[-2] == port}


@pytest.fixture(scope="session")
def fp32_run(fp32_run_and_shm) -> Path:
    """A finished 2-rank ZeRO-2 fp32 run with a checkpoint every step and eval at the end."""
    return fp32_run_and_shm[0]
