"""`benchmarks/device_check.sh --dry-run`: the device check's every step on the CPU, before a GPU
session is spent on it.

A lent GPU comes with about 15 minutes; a script that breaks in its set-up, its run configs, its
profiler hooks or its result files wastes them. The dry run runs both halves at tiny sizes
(gloo for NCCL, no compilation; benchmarks/device_check.py says what else differs) through the
same shell script the device runs. Its figures mean nothing and are not asserted on: only that
every step ran and left the records and files the device session is read from. About 80 s on a
quiet 2-core AMD EPYC VM (correctness 53 s, throughput 28 s; 2026-12-07), several minutes under
load: hence the generous timeout.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from helpers.training import REPO, env


@pytest.mark.multiproc
@pytest.mark.timeout(900)
def test_dry_run_runs_every_step_and_writes_what_the_device_returns(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", "benchmarks/device_check.sh", "all", "--dry-run", "--budget-s", "100000",
         "--workdir", str(tmp_path)],
        cwd=REPO, env=env(OUT=str(out), PYTHON=sys.executable), capture_output=True, text=True,
        timeout=840,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # what comes back from a device: at most 8 plain files, names the tool accepts
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(
        ["env.txt", "correctness.json", "correctness.log", "throughput.json", "throughput.log",
         "profile.txt", "train_gpu_smoke.json"]
    )  # fmt: skip
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files) and len(files) <= 8
    assert "torch" in (out / "env.txt").read_text()

    correctness = json.loads((out / "correctness.json").read_text())
    steps = correctness["steps"]
    assert list(steps) == ["1_engine_1rank", "2_zero3_compiled_export"]
    assert all(s["status"] == "ok" for s in steps.values()), steps
    one = steps["1_engine_1rank"]
    assert sorted(one["resume_loss_rel_diff_after_step_3"]) == ["4", "5", "6"]
    assert set(one["eval_loss_rel_diff_umbrella_eval_vs_in_training"]) == {"t1_sex", "all"}
    assert len(steps["2_zero3_compiled_export"]["export_base_sha256"]) == 64
    # a ZeRO-3 build and step 1's whole build of one preset and seed: one base (issue 22 §2)
    assert steps["2_zero3_compiled_export"]["same_base_as_step_1"] is True
    assert correctness["environment"]["torch"].startswith("2.")

    throughput = json.loads((out / "throughput.json").read_text())
    steps = throughput["steps"]
    assert list(steps) == [
        "3_t1_eager_vs_compiled", "4_rsfmri_compiled", "5_finder_and_patch_embed", "6_profile"
    ]  # fmt: skip
    assert all(s["status"] == "ok" for s in steps.values()), steps
    assert steps["3_t1_eager_vs_compiled"]["eager"]["samples_per_s"] > 0
    finder = steps["5_finder_and_patch_embed"]
    assert finder["finder_best"] == 4 and len(finder["finder_table"]) >= 3  # 1, 2, 4 all fit
    pe = finder["patch_embed"]
    assert pe["conv3d_ms"] > 0 and pe["reshape_linear_ms"] > 0
    assert pe["max_rel_diff"] < 1e-5  # the two formulations compute the same map (fp32 here)
    prof = steps["6_profile"]
    assert prof["clock"] == "CPU" and len(prof["top"]) == 15
    # the marked modules were seen, forward and backward, inside the traced steps
    assert {"patch_embed.forward", "patch_embed.backward (aten::convolution_backward)",
            "projector.forward", "projector.backward"} <= set(prof["range_shares"])  # fmt: skip
    assert all(0 < v < 1 for v in prof["range_shares"].values())
    assert 0 <= prof["data_wait_frac"] < 1
    table = (out / "profile.txt").read_text()
    assert "top 15 operators" in table and "host-to-device" in table and "data_wait_frac" in table
    smoke = json.loads((out / "train_gpu_smoke.json").read_text())
    assert "t1_64_eager_mb4_profile" in smoke["cases"]
