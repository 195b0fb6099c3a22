"""Fixtures of the training tests: the 400-subject cohort the learning test needs.

(The 48-subject `train_data` cohort and the shared `fp32_run` are in tests/conftest.py.)
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helpers.training import BIN


@pytest.fixture(scope="session")
def cohort_400(tmp_path_factory) -> Path:
    """400 subjects (320 train / 80 held out), T1 packed at 32^3: with fewer the tiny model
    memorises the training subjects before it generalises."""
    root = tmp_path_factory.mktemp("cohort-400")
    pack = str(BIN / "umbrella-pack")
    subprocess.run(
        [pack, "synth", "--out", root / "raw", "--subjects", "400", "--seed", "1",
         "--t1-shape", "48", "48", "48", "--frames", "8", "--rsfmri-shape", "16", "16", "16"],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    subprocess.run(
        [pack, "build", "--manifest", root / "raw" / "manifest.csv", "--out", root / "shards",
         "--workers", "2", "--modalities", "T1", "--t1-size", "32", "32", "32", "--no-progress"],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return root
