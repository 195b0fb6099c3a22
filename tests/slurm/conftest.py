"""A real two-node SLURM cluster for the launch tests: started once per session, stopped after.

``launch/local-cluster.sh start`` installs (apt, as root) and starts munged, slurmctld and two
slurmd; the fixture stops at the end only what that call started, so a cluster the user already
had running is left alone. Jobs are watched with ``scontrol show job`` (no accounting daemon).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from jobs import FINAL_STATES

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "launch" / "local-cluster.sh"


@dataclass(frozen=True)
class Cluster:
    """Handle on the running local cluster; every slurm command gets this SLURM_CONF."""

    conf: str

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env["SLURM_CONF"] = self.conf
        env.update(extra)
        return env

    def run(self, *args: str, timeout: float = 30) -> str:
        done = subprocess.run(
            list(args), env=self.env(), capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}"
            )
        return done.stdout

    def submit(self, script: str, sbatch_args: list[str], **env: str) -> str:
        """sbatch from the repository root (the scripts' documented way); returns the job id."""
        done = subprocess.run(
            ["sbatch", "--parsable", *sbatch_args, str(REPO / script)],
            cwd=REPO,
            env=self.env(**env),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, f"sbatch failed: {done.stderr}"
        return done.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (JobState, Reason, Restarts, ExitCode, ...)."""
        line = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def wait(self, job_id: str, timeout: float, until=None) -> dict[str, str]:
        """Polls until ``until(job)`` (default: a final state); fails naming the last state."""
        until = until or (lambda j: j["JobState"] in FINAL_STATES)
        deadline = time.monotonic() + timeout
        job: dict[str, str] = {}
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if until(job):
                return job
            time.sleep(1)
        self.run("scancel", job_id)
        raise AssertionError(
            f"job {job_id} still {job.get('JobState')} ({job.get('Reason')}) after {timeout}s"
        )

    def release(self, job_id: str, timeout: float = 60) -> None:
        """Starts a requeued job now instead of after Slurm's ~2 min BeginTime hold, once its nodes
        have finished the previous start (no longer "completing") and a second has passed. The
        CPU jobs share nodes (--oversubscribe), so nothing else holds the job back: released
        within the second of the requeue, its new start was killed as "Job credential revoked"
        (slurmd compares the credential's creation with the revocation at one-second
        resolution)."""
        deadline = time.monotonic() + timeout
        while any("comp" in s for s in self.run("sinfo", "-h", "-N", "-o", "%T").split()):
            assert time.monotonic() < deadline, f"nodes still completing after {timeout}s"
            time.sleep(0.5)
        time.sleep(1.5)
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")

    def cancel(self, job_id: str) -> None:
        subprocess.run(["scancel", job_id], env=self.env(), timeout=30, check=False)


@pytest.fixture(scope="session")
def slurm_cluster() -> Cluster:
    state_dir = Path(os.environ.get("UMBRELLA_SLURM_DIR", "/tmp/umbrella-slurm"))
    already_up = (
        subprocess.run(
            [str(CLUSTER), "status"], capture_output=True, timeout=60, check=False
        ).returncode
        == 0
    )
    started = subprocess.run(
        [str(CLUSTER), "start"], capture_output=True, text=True, timeout=900, check=False
    )
    assert started.returncode == 0, (
        f"local cluster did not start:\n{started.stdout}\n{started.stderr}"
    )
    yield Cluster(conf=str(state_dir / "slurm.conf"))
    if not already_up:
        subprocess.run([str(CLUSTER), "stop"], capture_output=True, timeout=120, check=False)


@pytest.fixture(scope="session")
def cohort_24(packed_cohort) -> Path:
    """24 synthetic subjects (synth's default grids), T1 packed at 32^3, for the trainer the SLURM
    jobs run."""
    return packed_cohort(24, 0, t1_shape=(40, 48, 40), frames=16, rsfmri_shape=(24, 28, 24))
