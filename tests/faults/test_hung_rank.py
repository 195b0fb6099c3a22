"""A hung rank (SIGSTOPped mid-run) ends the job within ``train.collective_timeout_s``.

Without ``env.set_default_group_timeout`` rank 0 would wait torch's 30-minute default inside a
ZeRO all-reduce (DeepSpeed's groups come from ``dist.new_group`` without a timeout).
"""

from __future__ import annotations

import signal

import pytest
from helpers.faults import rank_processes, training_job
from helpers.training import base_sets, metrics, wait_for

pytestmark = pytest.mark.multiproc
TIMEOUT_S = 10
# The launcher notices rank 0's exit within ~1 s, then SIGTERMs the stopped rank and SIGKILLs it
# 30 s later (psutil.wait_procs in deepspeed.launcher.launch): timeout + 30 s + margin.
END_WITHIN_S = TIMEOUT_S + 30 + 40


@pytest.mark.timeout(300)
def test_stopped_rank_ends_job_within_collective_timeout(train_data, tmp_path):
    out = tmp_path / "run"
    sets = base_sets(
        train_data,
        out,
        **{
            "train.max_steps": 100000,
            "checkpoint.every_steps": 0,
            "train.collective_timeout_s": TIMEOUT_S,
        },
    )
    log = tmp_path / "run.log"
    with training_job(2, sets, log) as proc:
        wait_for(lambda: len(metrics(out)) >= 2, proc, 200, "two training steps")
        ranks = rank_processes(proc.pid)
        assert len(ranks) == 2
        ranks[1].send_signal(signal.SIGSTOP)
        code = proc.wait(timeout=END_WITHIN_S)  # TimeoutExpired = still hanging: the bug
    text = log.read_text()
    assert code != 0, text[-3000:]
    assert "Timed out" in text or "timed out" in text, text[-3000:]
