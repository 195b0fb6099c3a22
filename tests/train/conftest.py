"""Fixtures of the training tests: the 400-subject cohort the learning test needs.

(The 48-subject `train_data` cohort and the shared `fp32_run` are in tests/conftest.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cohort_400(packed_cohort) -> Path:
    """400 subjects (320 train / 80 held out), T1 packed at 32^3: with fewer the tiny model
    memorises the training subjects before it generalises."""
    return packed_cohort(400, 1)
