"""launch/train.sbatch and launch/train-srun.sbatch on a real two-node SLURM cluster.

One uninterrupted run is the reference; the interrupted runs (USR1 by hand, USR1 ahead of a time
limit) must checkpoint, requeue themselves, resume and end exactly where the reference ended.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from jobs import (
    FINAL_STATES,
    REPO,
    Trainer,
    job_log,
    latest_checkpoint,
    rank_pids,
    start_records,
    train_records,
    trained_weights,
    wait_for_step,
)

pytestmark = [pytest.mark.slurm, pytest.mark.multiproc, pytest.mark.slow]

MAX_STEPS = 60  # ~10 tiny steps/s here: long enough to be interrupted mid-run
JOB_TIMEOUT_S = 150


@pytest.fixture(scope="module")
def trainer(cohort_24) -> Trainer:
    """The real trainer on the tiny preset (configs/demo.yaml) over a small synthetic cohort."""
    data = cohort_24
    instructions = data / "raw" / "instructions"
    overrides = [
        f"data.shards={data / 'shards'}",
        f"data.train=[{instructions / 't1_sex_train.jsonl'}]",
        f"data.eval=[{instructions / 't1_sex_eval.jsonl'}]",
        f"train.max_steps={MAX_STEPS}",
        "train.global_batch=4",
        "train.micro_batch=2",
        "checkpoint.every_steps=1000",
        "eval.at_end=false",
        "log.every_steps=1",
        "log.tensorboard=false",
        "train.device=cpu",  # the local cluster's nodes declare (fake) GPUs
    ]
    return Trainer(
        script="umbrella_ds/train/__main__.py",
        config="configs/demo.yaml",
        overrides=" ".join(overrides),
        env={"TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache"))},
    )


def _two_node_args(out: Path, *extra: str) -> list[str]:
    """sbatch options: two nodes, one rank each, the job log beside OUT (slurm-JOBID.out).
    --oversubscribe undoes the scripts' --exclusive, which would give the job every (fake) GPU
    of the nodes and so two ranks per node: these runs are CPU runs, one rank per node."""
    return [
        "-N", "2", "--oversubscribe", "--ntasks-per-node=1",
        "-o", str(out.parent / "slurm-%j.out"), *extra,
    ]  # fmt: skip


def _two_nodes(out: Path) -> None:
    starts = start_records(out)
    assert starts, f"no start record in {out}/metrics.jsonl"
    for start in starts:
        nodes = {r["slurm_node"] for r in start["ranks"]}
        assert nodes == {"node1", "node2"}, f"ranks not on both nodes: {start['ranks']}"


def _final(out: Path) -> tuple[float, dict[str, torch.Tensor]]:
    records = train_records(out)
    assert records and records[-1]["step"] == MAX_STEPS, (
        f"run did not reach step {MAX_STEPS}: {records[-1:]}"
    )
    return records[-1]["loss"], trained_weights(latest_checkpoint(out))


def _resumed_step(start: dict) -> int:
    """Step of the checkpoint a start resumed from (0 for a fresh start)."""
    src = start.get("resumed_from")
    return int(Path(src).name.split("-")[1]) if src else 0


def _run_to_end(cluster, trainer, out: Path, script: str) -> Path:
    job = cluster.submit(script, _two_node_args(out), **trainer.job_env(out))
    state = cluster.wait(job, JOB_TIMEOUT_S)
    assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), job_log(out, job)
    return out


@pytest.fixture(scope="module")
def reference(slurm_cluster, trainer, tmp_path_factory) -> Path:
    """train.sbatch -N 2, uninterrupted."""
    out = tmp_path_factory.mktemp("reference") / "out"
    return _run_to_end(slurm_cluster, trainer, out, "launch/train.sbatch")


@pytest.fixture(scope="module")
def reference_srun(slurm_cluster, trainer, tmp_path_factory) -> Path:
    """train-srun.sbatch -N 2, uninterrupted. Its own reference: the two launchers' curves are
    not bit-identical (they differ from the first optimizer step on)."""
    out = tmp_path_factory.mktemp("reference-srun") / "out"
    return _run_to_end(slurm_cluster, trainer, out, "launch/train-srun.sbatch")


@pytest.mark.timeout(600)  # includes the data, maybe the cluster start and the first JIT build
def test_train_sbatch_runs_on_both_nodes(reference):
    _two_nodes(reference)
    assert [r["step"] for r in train_records(reference)] == list(range(1, MAX_STEPS + 1))


def _requeued_or_done(job: dict[str, str]) -> bool:
    return (job["JobState"] == "PENDING" and job["Restarts"] != "0") or job[
        "JobState"
    ] in FINAL_STATES


def _interrupt_and_resume(cluster, trainer, out: Path, script: str) -> str:
    """Submits, sends USR1 as `scancel --full` would mid-run, releases the requeued job."""
    job = cluster.submit(
        script,
        _two_node_args(out),
        **trainer.job_env(out),
    )
    wait_for_step(out, 3, timeout=JOB_TIMEOUT_S)
    cluster.run("scancel", "--signal=USR1", "--full", job)
    state = cluster.wait(
        job,
        JOB_TIMEOUT_S,
        until=_requeued_or_done,
    )
    assert state["JobState"] == "PENDING" and state["Restarts"] == "1", (state, job_log(out, job))
    cluster.release(job)
    state = cluster.wait(job, JOB_TIMEOUT_S)
    assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), job_log(out, job)
    return job


@pytest.mark.timeout(3 * JOB_TIMEOUT_S + 60)
@pytest.mark.parametrize("script", ["launch/train.sbatch", "launch/train-srun.sbatch"])
def test_usr1_checkpoints_requeues_and_resumes_exactly(
    slurm_cluster, trainer, request, tmp_path, script
):
    """Interrupted and resumed == uninterrupted, for the same script."""
    reference = request.getfixturevalue("reference_srun" if "srun" in script else "reference")
    out = tmp_path / "out"
    job = _interrupt_and_resume(slurm_cluster, trainer, out, script)
    log = job_log(out, job)
    assert "requeueing (restart 1 of at most 3)" in log
    starts = start_records(out)
    assert len(starts) == 2 and _resumed_step(starts[1]) > 0, (
        f"second start did not resume: {starts}"
    )
    _two_nodes(out)
    loss, weights = _final(out)
    ref_loss, ref_weights = _final(reference)
    assert loss == ref_loss
    assert weights.keys() == ref_weights.keys() and weights
    for key, tensor in weights.items():
        assert torch.equal(tensor, ref_weights[key]), key


@pytest.mark.timeout(330)
def test_time_limit_checkpoints_requeues_resumes_then_stops_at_max_requeues(
    slurm_cluster, trainer, tmp_path
):
    """--time=1 with --signal=B:USR1@50 and MAX_REQUEUES=1. Slurm sends the warning up to a
    minute early (its event resolution), possibly before the ranks exist; the script holds it
    until they are up. First start: checkpoint and requeue before the limit. Second start:
    resumes from that checkpoint, is signalled again, checkpoints and, with no requeue left,
    ends with status 75 and a message."""
    out = tmp_path / "out"
    job = slurm_cluster.submit(
        "launch/train.sbatch",
        _two_node_args(out, "--time=1", "--signal=B:USR1@50"),
        **trainer.job_env(out, extra_overrides="train.max_steps=100000", MAX_REQUEUES="1"),
    )
    try:
        state = slurm_cluster.wait(job, 150, until=_requeued_or_done)
        log = job_log(out, job)
        assert (state["JobState"], state["Restarts"]) == ("PENDING", "1"), (state, log)
        assert "got SIGUSR1" in log and "requeueing (restart 1 of at most 1)" in log, log
        first_stop = int(latest_checkpoint(out).name.split("-")[1])
        slurm_cluster.release(job)
        state = slurm_cluster.wait(job, 150)
        log = job_log(out, job)
        assert (state["JobState"], state["ExitCode"], state["Restarts"]) == (
            "FAILED",
            "75:0",
            "1",
        ), (
            state,
            log,
        )
        assert "MAX_REQUEUES=1" in log and "not requeueing" in log, log
        starts = start_records(out)
        assert [_resumed_step(s) for s in starts] == [0, first_stop], starts
        second_stop = int(latest_checkpoint(out).name.split("-")[1])
        assert second_stop > first_stop and train_records(out)[-1]["step"] == second_stop
    finally:
        slurm_cluster.cancel(job)


def _start_then(
    cluster, trainer, out: Path, action, overrides: str = "", end_within_s: float = 90
) -> tuple[dict, str]:
    """Starts a long run, applies ``action`` to rank 1's process, waits for the job to end."""
    job = cluster.submit(
        "launch/train.sbatch",
        _two_node_args(out),
        **trainer.job_env(out, extra_overrides=f"train.max_steps=100000 {overrides}"),
    )
    wait_for_step(out, 2, timeout=JOB_TIMEOUT_S)
    pids = rank_pids(job, 1, trainer.script)
    assert len(pids) == 1, f"rank 1 process not found uniquely: {pids}"
    action(pids[0])
    state = cluster.wait(job, end_within_s)
    return state, job_log(out, job)


@pytest.mark.timeout(JOB_TIMEOUT_S + 120)
def test_killed_rank_fails_job_naming_rank_and_node(slurm_cluster, trainer, tmp_path):
    out = tmp_path / "out"
    state, log = _start_then(slurm_cluster, trainer, out, lambda pid: os.kill(pid, signal.SIGKILL))
    assert state["JobState"] == "FAILED", (state, log)
    assert "rank 1 on node node2 failed: Killed" in log, log


@pytest.mark.timeout(JOB_TIMEOUT_S + 120)
def test_hung_rank_ends_job_within_collective_timeout(slurm_cluster, trainer, tmp_path):
    """A stopped (hung) rank 1: rank 0 gives up at train.collective_timeout_s (20 s), which
    ends the job (the batch script kills the remaining ranks) well before the 60 s allowed."""
    out = tmp_path / "out"
    state, log = _start_then(
        slurm_cluster,
        trainer,
        out,
        lambda pid: os.kill(pid, signal.SIGSTOP),
        overrides="train.collective_timeout_s=20",
        end_within_s=60,
    )
    assert state["JobState"] == "FAILED", (state, log)
    assert "a rank failed (srun: error: node1: task 0:" in log, log


@pytest.mark.timeout(JOB_TIMEOUT_S + 60)
@pytest.mark.parametrize("script", ["launch/train.sbatch", "launch/train-srun.sbatch"])
def test_gpu_gres_job_runs_one_rank_per_gpu(slurm_cluster, trainer, tmp_path, script):
    """`sbatch -N 2 --gpus-per-node=2` on nodes with 2 (fake) GPUs each: 2 ranks per node, 4 in
    all, each with 1 of its node's 2 CPUs (SRUN_CPUS_PER_TASK, OMP_NUM_THREADS left to the
    script). CPU training is asked for (train.device=cpu): there is no GPU behind the GRES.
    Two steps only: 4 ranks share this machine's 2 cores."""
    out = tmp_path / "out"
    job = slurm_cluster.submit(
        script,
        ["-N", "2", "--gpus-per-node=2", "-o", str(out.parent / "slurm-%j.out")],
        **trainer.job_env(
            out,
            extra_overrides="train.max_steps=2 train.global_batch=4 train.micro_batch=1",
            OMP_NUM_THREADS="",
        ),
    )
    state = slurm_cluster.wait(job, JOB_TIMEOUT_S)
    log = job_log(out, job)
    assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert "2 ranks per node (2 GPUs per node), 1 of the node's 2 CPUs per rank, OMP_NUM_THREADS=1" in log, log  # fmt: skip
    (start,) = start_records(out)
    assert start["world_size"] == 4, start
    nodes = sorted(r["slurm_node"] for r in start["ranks"])
    assert nodes == ["node1", "node1", "node2", "node2"], start["ranks"]
    assert [r["step"] for r in train_records(out)] == [1, 2]
