"""Helpers for the fault-injection tests: start a 2-rank run in its own session,
find its rank processes, and make sure nothing of it survives the test."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil

from .training import REPO, TRAIN_SCRIPT, env, train_cmd


def rank_processes(launcher_pid: int) -> list[psutil.Process]:
    """The rank processes under the deepspeed launcher, ordered by local rank."""
    procs = psutil.Process(launcher_pid).children(recursive=True)
    ranks = [p for p in procs if p.cmdline()[1:3] == ["-u", str(TRAIN_SCRIPT)]]
    return sorted(ranks, key=lambda p: _local_rank(p.cmdline()))


def _local_rank(cmdline: list[str]) -> int:
    for arg in cmdline:
        if arg.startswith("--local_rank="):
            return int(arg.split("=", 1)[1])
    raise AssertionError(f"no --local_rank in {cmdline}")


@contextlib.contextmanager
def training_job(
    nproc: int, sets: list[str], log_path: Path, **environ: str
) -> Iterator[subprocess.Popen]:
    """A training job in a new session; its whole process group is SIGKILLed on the way out
    (a no-op when it already ended), so a failed assertion leaves no orphan rank behind."""
    log = open(log_path, "w")  # noqa: SIM115  (closed below)
    proc = subprocess.Popen(
        train_cmd(nproc, sets),
        env=env(**environ),
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGCONT)  # a stopped rank cannot die until continued
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        log.close()


def run_in_session(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    """``subprocess.run`` whose whole process group is killed on timeout."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kw
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
