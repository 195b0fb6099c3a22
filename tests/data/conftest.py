"""Fixtures of the data tests: a 6-subject cohort packed into real shards."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cohort_6(packed_cohort) -> Path:
    """6 synthetic subjects (T1 16^3, rsfMRI 8^3 x 12 frames) packed into real shards at 8^3
    with the project's own CLI."""
    return packed_cohort(6, 0, 8, ("T1", "rsfMRI"), t1_shape=16, frames=12, rsfmri_shape=8)
