"""Shared test settings (CPU DeepSpeed, cached extension builds, repository paths) and the
fixtures more than one folder uses: the 48-subject training cohort and one finished 2-rank run.

Session fixtures are built once per session, on first use. A folder's own fixtures live in its
conftest.py; helpers (no fixtures) live in tests/helpers/.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.training import BIN, base_sets, check, run_train

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
def train_data(tmp_path_factory) -> Path:
    """A small synthetic cohort, T1 packed at 32^3 (48 subjects: 38 train, 10 eval)."""
    root = tmp_path_factory.getbasetemp() / "train-data"
    raw = root / "raw"
    subprocess.run(
        [BIN / "umbrella-pack", "synth", "--out", raw, "--subjects", "48", "--seed", "0",
         "--t1-shape", "48", "48", "48", "--frames", "8", "--rsfmri-shape", "16", "16", "16"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    subprocess.run(
        [BIN / "umbrella-pack", "build", "--manifest", raw / "manifest.csv", "--out",
         root / "shards", "--workers", "1", "--modalities", "T1", "--t1-size", "32", "32", "32",
         "--no-progress"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return root


@pytest.fixture(scope="session")
def fp32_run(train_data, tmp_path_factory) -> Path:
    """A finished 2-rank ZeRO-2 fp32 run with a checkpoint every step and eval at the end."""
    out = tmp_path_factory.getbasetemp() / "fp32-run"
    sets = base_sets(
        train_data,
        out,
        **{"train.max_steps": 4, "train.bf16": "false", "checkpoint.every_steps": 1,
           "checkpoint.keep_last": 2, "eval.at_end": "true", "eval.max_new_tokens": 4},
    )  # fmt: skip
    check(run_train(2, sets, timeout=300))
    return out
