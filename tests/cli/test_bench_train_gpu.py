"""`benchmarks/train_gpu.py --smoke`: the GPU benchmark's whole plumbing, on CPU, before a GPU
session is spent on it.

A GPU session lasts minutes; a script that breaks in its data preparation, its run config, its
rank wrapper or its metrics parsing wastes all of it. The smoke mode runs the same functions
with the `tiny` preset on CPU (three short cases: T1 eager, T1 with checkpointing, rsfMRI), so a
break shows here. The figures it writes mean nothing and are not asserted on: only that every
case ran inside the engine and produced the records the GPU figures are read from.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers.training import REPO, env

# benchmarks/ is run as a module from the repository root, not installed: named here, not imported
SMOKE_CASES = ("t1_64_eager_mb4", "t1_64_eager_mb4_ckpt", "rs_256_eager_mb2")


@pytest.mark.timeout(360)
def test_smoke_runs_every_case_through_the_engine(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_gpu", "--smoke",
         "--workdir", str(tmp_path), "--results-dir", str(tmp_path)],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "train_gpu_smoke.json").read_text())
    cases = result["config"]["cases"]  # what the script says it ran, with steps and warm-up
    assert list(cases) == list(result["cases"]) == list(SMOKE_CASES)
    for name, case in result["cases"].items():
        assert case["status"] == "ok", (name, case)
        # every step after the warm-up was measured, and its rates came from the engine's records
        assert case["steps_measured"] == cases[name]["steps"] - cases[name]["warmup"], (name, case)
        assert case["samples_per_s"] > 0 and case["tokens_per_s"] > case["samples_per_s"]
        assert 0.0 <= case["data_wait_frac"] < 1.0
        assert case["mfu"] is None  # no GPU peak on CPU: null, never a made-up figure
    assert set(result["ratio"]) == {"T1 64 eager checkpointing on / off (mb 4)"}
    # the temporary data and runs are cleaned away; only the result stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_gpu_smoke.json"]


def test_unknown_case_is_a_usage_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_gpu", "--smoke", "--only", "t1_64_eager_mb4",
         "no_such_case", "--results-dir", str(tmp_path)],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "no_such_case" in proc.stderr and "t1_64_eager_mb4" in proc.stderr
    assert not list(tmp_path.iterdir())
