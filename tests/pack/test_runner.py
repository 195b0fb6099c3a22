"""The packing job runner (data_prep/runner.py): one scheduler for build and dry run.

What the build's byte-equality tests cannot see: results come back in job order whichever
process ran a job, the coordinator works as well as its helpers, and every subject reported in
a helper process reaches the coordinator's progress bar.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import pytest

from data_prep import runner


def _square(job: int, report: Callable[[int], None]) -> tuple[int, int]:
    for _ in range(job):
        report(10)
    return job * job, os.getpid()


@pytest.mark.multiproc
@pytest.mark.timeout(180)
def test_results_in_job_order_from_coordinator_and_helper(monkeypatch) -> None:
    reports: list[int] = []
    monkeypatch.setattr(
        runner, "progress_bar", lambda total, enabled: (contextlib.nullcontext(), reports.append)
    )
    jobs = [3, 1, 4, 1, 5, 9, 2]
    got = runner.run_jobs(jobs, _square, workers=2, subjects=sum(jobs), progress=False)
    assert [r for r, _ in got] == [j * j for j in jobs]
    # The coordinator takes jobs from the back at once; the helper runs the two it was handed.
    assert len({pid for _, pid in got}) == 2 and got[-1][1] == os.getpid()
    assert reports == [10] * sum(jobs)


def test_one_worker_runs_in_this_process(monkeypatch) -> None:
    reports: list[int] = []
    monkeypatch.setattr(
        runner, "progress_bar", lambda total, enabled: (contextlib.nullcontext(), reports.append)
    )
    got = runner.run_jobs([2, 0, 1], _square, workers=1, subjects=3, progress=False)
    assert got == [(4, os.getpid()), (0, os.getpid()), (1, os.getpid())]
    assert reports == [10, 10, 10]
