"""A user error under SLURM: launch/train.sbatch (deepspeed --launcher slurm, two nodes) ends with
exit status 2 and the job log holds the one ``error:`` line once (rank 0), no traceback.

An unknown config key is found by every rank before anything is built, so the job needs no data
and costs only the ranks' start-up."""

from __future__ import annotations

from pathlib import Path

import pytest
from jobs import Trainer, job_log

pytestmark = [pytest.mark.slurm, pytest.mark.multiproc]


@pytest.mark.timeout(300)
def test_a_config_error_ends_the_job_with_status_2_and_one_line(slurm_cluster, tmp_path: Path):
    out = tmp_path / "out"
    trainer = Trainer(
        "umbrella_ds/train/__main__.py", "configs/demo.yaml", "train.lr_schedule=cosine"
    )
    args = [
        "-N",
        "2",
        "--oversubscribe",
        "--ntasks-per-node=1",
        "-o",
        str(tmp_path / "slurm-%j.out"),
    ]
    job = slurm_cluster.submit("launch/train.sbatch", args, **trainer.job_env(out))
    state = slurm_cluster.wait(job, 240)
    log = job_log(out, job)
    assert (state["JobState"], state["ExitCode"]) == ("FAILED", "2:0"), log
    lines = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith(
        "error: train.lr_schedule: unknown config key(s) (known: "
    ), log
    assert "Traceback" not in log and "a user error (exit status 2)" in log


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("sbatch_args", "line"),
    [
        (
            ["--gpus-per-node=2", "--ntasks-per-node=1"],
            "error: --ntasks-per-node=1 differs from the 2 GPUs per node: one rank runs per GPU;",
        ),
        (
            ["--gpus-per-node=2", "--cpus-per-task=2"],
            "error: --cpus-per-task=2 x 2 ranks per node is more than the 2 CPUs the job holds on node1;",
        ),
    ],
    ids=["ntasks-per-node", "cpus-per-task"],
)
def test_a_submission_that_leaves_gpus_idle_or_overfills_a_node_is_refused(
    slurm_cluster, tmp_path: Path, sbatch_args: list[str], line: str
):
    """On the local cluster's nodes (2 fake GPUs, 2 CPUs each) the batch script refuses, in one
    line and with status 2, before any rank starts."""
    out = tmp_path / "out"
    trainer = Trainer("umbrella_ds/train/__main__.py", "configs/demo.yaml", "train.device=cpu")
    args = ["-N", "2", *sbatch_args, "-o", str(tmp_path / "slurm-%j.out")]
    job = slurm_cluster.submit("launch/train.sbatch", args, **trainer.job_env(out))
    state = slurm_cluster.wait(job, 90)
    log = job_log(out, job)
    assert (state["JobState"], state["ExitCode"]) == ("FAILED", "2:0"), log
    errors = [x for x in log.splitlines() if "error: " in x]
    assert len(errors) == 1 and line in errors[0], log
    assert "running:" not in log, log
