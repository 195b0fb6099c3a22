"""SIGKILL of one rank mid-step: the deepspeed launcher notices, kills the other rank and exits
with an error naming the dead rank; ``--resume auto`` then continues from the last checkpoint.

(A stopped, hung rank: test_hung_rank.py. The whole job killed after a checkpoint, with an exact
resume: tests/train/test_train_resume.py. The SLURM scripts' own report of a killed rank:
tests/slurm/test_slurm_train.py::test_killed_rank_fails_job_naming_rank_and_node.)
"""

from __future__ import annotations

import signal

import pytest
from helpers.faults import rank_processes, training_job
from helpers.training import base_sets, check, metrics, run_train, wait_for

pytestmark = pytest.mark.multiproc
STEPS, EVERY = 10, 3


@pytest.mark.timeout(400)
def test_killed_rank_ends_job_naming_it_and_restart_resumes(train_data, tmp_path):
    out = tmp_path / "run"
    sets = base_sets(
        train_data,
        out,
        **{
            "train.max_steps": STEPS,
            "checkpoint.every_steps": EVERY,
            "train.collective_timeout_s": 60,
        },
    )
    log = tmp_path / "run.log"
    latest = out / "checkpoints" / "latest"
    with training_job(2, sets, log) as proc:
        wait_for(
            lambda: latest.is_file() and len(metrics(out)) >= EVERY + 1, proc, 240, "a checkpoint"
        )
        ranks = rank_processes(proc.pid)
        assert len(ranks) == 2
        ranks[1].send_signal(signal.SIGKILL)
        code = proc.wait(timeout=120)
    text = log.read_text()
    assert code != 0, text[-3000:]
    # Named by the surviving rank (env.watch_local_peers); the launcher's own line only shows
    # the command of the last rank it started, whichever died.
    assert "rank 1 (pid" in text and "has died" in text, text[-3000:]
    assert "[rank 0] ERROR" in text.split("has died")[0].splitlines()[-1], text[-3000:]
    assert "exits with return code = -9" in text, text[-3000:]
    saved = latest.read_text().strip()
    assert int(saved.split("-")[1]) < STEPS, "the run finished before the rank was killed"
    check(run_train(2, sets, timeout=240))
    assert metrics(out, "start")[-1]["resumed_from"].endswith(saved)
    assert [r["step"] for r in metrics(out)][-1] == STEPS
