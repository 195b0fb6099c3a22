"""The one job runner of ``umbrella-pack build``: shard jobs on K local processes, one bar.

A build and a dry run both come through here (a dry run is a build whose writer discards), and so
does each MPI rank's share (K = 1). The runner knows nothing of shards: it calls
``work(job, report)`` for each job and returns the results in job order; ``report(nbytes)`` is
called once per subject and moves the progress bar, whichever process ran the job.

Why the coordinator works too: a spawned helper needs seconds to import torch before its first
job (measured: 2.8 s on the 2-core VM), and the coordinator, which has everything imported,
would otherwise sit idle collecting results. It takes jobs from the back of the list while
helpers take them from the front, and between its own jobs hands helpers new ones (each helper
has one running and one queued, so none waits on the coordinator). Every process runs one
intra-op thread: K workers on K cores, no oversubscription. A job is still run start to finish
by one process, so its output never depends on K.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from queue import Empty
from typing import Any, TypeVar

from tqdm import tqdm

J = TypeVar("J")
R = TypeVar("R")
Report = Callable[[int], None]

# A helper process's way to the coordinator's bar: the queue it was started with (set once, by
# _start_helper; the coordinator never uses it, it passes its bar's update directly).
_to_coordinator: Any = None


def run_jobs(
    jobs: Sequence[J],
    work: Callable[[J, Report], R],
    *,
    workers: int,
    subjects: int,
    progress: bool,
) -> list[R]:
    """``work(job, report)`` for every job on ``workers`` processes; results in job order.

    ``subjects`` is the bar's total (the calls to ``report`` the jobs will make). ``work`` must
    pickle when ``workers > 1`` (a module-level function, or a partial of one)."""
    bar, update = progress_bar(subjects, progress)
    with bar:
        if workers == 1 or len(jobs) <= 1:
            return [work(job, update) for job in jobs]
        return _run_pool(list(jobs), work, workers, update)


def progress_bar(total: int, enabled: bool) -> tuple[Any, Report]:
    """tqdm bar over subjects; the postfix is packed float16 MB/s."""
    bar = tqdm(total=total, unit="subj", desc="packing", disable=not enabled, mininterval=1.0)
    start = time.perf_counter()
    written = [0]

    def update(nbytes: int) -> None:
        written[0] += nbytes
        elapsed = max(time.perf_counter() - start, 1e-9)
        bar.set_postfix_str(f"{written[0] / elapsed / 1e6:.1f} MB/s", refresh=False)
        bar.update(1)

    return bar, update


def _run_pool(
    jobs: list[J], work: Callable[[J, Report], R], workers: int, update: Report
) -> list[R]:
    """``workers - 1`` spawned helpers take jobs from the front, this process from the back."""
    import torch

    ctx = mp.get_context("spawn")  # h5py/torch state never crosses a fork
    queue = ctx.Queue()
    helpers = workers - 1
    todo = deque(range(len(jobs)))
    results: dict[int, R] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ProcessPoolExecutor(
            helpers, mp_context=ctx, initializer=_start_helper, initargs=(queue,)
        ) as pool:
            pending: dict[Any, int] = {}

            def refill() -> None:
                while todo and len(pending) < 2 * helpers:
                    i = todo.popleft()
                    pending[pool.submit(_in_helper, work, jobs[i])] = i

            refill()
            while todo or pending:
                if todo:
                    i = todo.pop()
                    results[i] = work(jobs[i], update)
                done, _ = wait(pending, timeout=0 if todo else 0.5, return_when=FIRST_COMPLETED)
                _drain(queue, update)
                for fut in done:
                    results[pending.pop(fut)] = fut.result()
                refill()
        _drain(queue, update)
    finally:
        torch.set_num_threads(threads)
    return [results[i] for i in range(len(jobs))]


def _start_helper(queue: Any) -> None:
    """Helper process start-up: one intra-op thread, progress reports to ``queue``."""
    global _to_coordinator
    import torch

    torch.set_num_threads(1)  # K workers on K cores; determinism does not depend on it
    _to_coordinator = queue


def _in_helper(work: Callable[[J, Report], R], job: J) -> R:
    return work(job, _to_coordinator.put)


def _drain(queue: Any, update: Report) -> None:
    while True:
        try:
            update(queue.get_nowait())
        except Empty:
            return
