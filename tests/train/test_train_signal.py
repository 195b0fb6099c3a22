"""Stopping: SIGUSR1 leaves a loadable checkpoint and exit status 75; non-finite steps are skipped
and too many in a row stop the run (exit 1) with the last good checkpoint intact."""

from __future__ import annotations

import json
import math
import signal

import psutil
import pytest
from helpers.training import (
    TRAIN_SCRIPT,
    base_sets,
    check,
    env,
    metrics,
    run_train,
    start_train,
    wait_for,
)

from umbrella_ds.train.trained import trained_state

pytestmark = pytest.mark.multiproc


def _rank_processes(launcher_pid: int) -> list[psutil.Process]:
    procs = psutil.Process(launcher_pid).children(recursive=True)
    # The ranks run the script itself; the launcher (python -m deepspeed.launcher.launch) only names it.
    return [p for p in procs if p.cmdline()[1:3] == ["-u", str(TRAIN_SCRIPT)]]


@pytest.mark.timeout(400)
def test_sigusr1_checkpoints_and_exits_75(train_data, tmp_path):
    out = tmp_path / "run"
    sets = base_sets(train_data, out, **{"train.max_steps": 100000, "checkpoint.every_steps": 0})
    proc = start_train(2, sets, tmp_path / "run.log")
    try:
        wait_for(lambda: len(metrics(out)) >= 2, proc, 240, "two training steps")
        ranks = _rank_processes(proc.pid)
        assert len(ranks) == 2
        for p in ranks:  # as SLURM's --signal does: every rank gets it
            p.send_signal(signal.SIGUSR1)
        assert proc.wait(timeout=120) == 75, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    latest = (out / "checkpoints" / "latest").read_text().strip()
    step = int(latest.split("-")[1])
    meta = json.loads((out / "checkpoints" / latest / "meta.json").read_text())
    assert meta["step"] == step == metrics(out)[-1]["step"]
    assert set(trained_state(out / "checkpoints" / latest))  # DeepSpeed files load
    # ... and training continues from it.
    sets = base_sets(train_data, out, **{"train.max_steps": step + 2, "checkpoint.every_steps": 0})
    check(run_train(2, sets, timeout=240))
    assert metrics(out, "start")[-1]["resumed_from"].endswith(latest)
    assert [r["step"] for r in metrics(out)][-2:] == [step + 1, step + 2]


@pytest.mark.timeout(300)
def test_nan_steps_are_skipped_then_stop_the_run(train_data, tmp_path):
    out = tmp_path / "run"
    sets = base_sets(
        train_data,
        out,
        **{"train.max_steps": 12, "checkpoint.every_steps": 4, "train.max_bad_steps": 3},
    )
    proc = run_train(2, sets, environ=env(UMBRELLA_INJECT_NAN_STEPS="2,6,7,8"), timeout=240)
    check(proc, expect=1)
    assert "non-finite" in proc.stdout + proc.stderr
    records = {r["step"]: r for r in metrics(out)}
    assert records[2]["skipped"] and records[2]["loss"] is None
    assert not records[3]["skipped"] and math.isfinite(records[3]["loss"])
    assert max(records) == 7  # steps 6 and 7 logged as skipped; step 8 is the third: stop
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-0000004"
    before = trained_state(out / "checkpoints" / "step-0000004")
    assert all(v.isfinite().all() for v in before.values())
