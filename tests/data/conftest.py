"""Fixtures of the data tests: a 6-subject cohort packed into real shards."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cohort_6(tmp_path_factory) -> Path:
    """6 synthetic subjects (T1 16^3, rsfMRI 8^3 x 12 frames) packed into real shards at 8^3
    with the project's own CLI."""
    root = tmp_path_factory.mktemp("cohort-6")
    pack = [sys.executable, "-m", "data_prep.cli"]
    subprocess.run(
        [*pack, "synth", "--out", str(root / "raw"), "--subjects", "6", "--seed", "0",
         "--t1-shape", "16", "16", "16", "--frames", "12", "--rsfmri-shape", "8", "8", "8"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    subprocess.run(
        [*pack, "build", "--manifest", str(root / "raw" / "manifest.csv"), "--out", str(root / "shards"),
         "--t1-size", "8", "8", "8", "--rsfmri-size", "8", "8", "8", "--no-progress"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return root
