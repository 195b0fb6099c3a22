"""Learning, end to end through ``python -m umbrella_ds.demo``: 2-rank ZeRO-2 training of ``tiny``
on the synthetic T1 sex task lowers the loss substantially and beats chance on held-out subjects
(greedy answers), and the demo writes its report and plot."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers.training import REPO, env

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]


@pytest.mark.timeout(1200)
def test_demo_learns_sex_from_t1(cohort_400, tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "umbrella_ds.demo", "--config", "configs/demo.yaml",
         "--data", cohort_400, "--out", out, "--set", "log.progress=false",
         "checkpoint.every_steps=0"],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=1000,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    first, last = train[0]["loss"], sum(r["loss"] for r in train[-5:]) / 5
    assert last < 0.1 * first, (first, last)
    ev = next(r for r in records if r["split"] == "eval" and r["task"] == "t1_sex")
    assert ev["count"] == 80 and ev["unparseable"] == 0
    # 80 held-out subjects: 0.7 is out of reach of a coin (p < 0.001); the demo reaches ~0.95.
    assert ev["accuracy"] >= 0.7, ev
    report = (out / "report.md").read_text()
    assert "t1_sex" in report and "accuracy" in report and "patch embedding" in report
    assert (out / "loss.png").stat().st_size > 1000
