"""Exact resume: a 2-rank run SIGKILLed after a checkpoint and resumed equals the uninterrupted run
(ZeRO-2 and ZeRO-3); resuming 2 ranks -> 1 keeps the global batch and the data position.

Not cases of the equivalence driver (tests/equivalence/driver.py), unlike the accumulation and
compile comparisons: the killed job must be a launch of its own, and the 1e-6 bound compares the
resumed process with a reference that, like it, ran alone in a fresh process (a ZeRO-3 run earlier
in the same process moves a later ZeRO-2 loss by ~1e-6: tests/equivalence/cases.py).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from helpers.training import (
    base_sets,
    check,
    kill_tree,
    losses_by_step,
    metrics,
    run_train,
    start_train,
    wait_for,
)

from umbrella_ds.train.trained import trained_state

pytestmark = pytest.mark.multiproc
STEPS, EVERY = 24, 8


def _sets(data: Path, out: Path, stage: str) -> list[str]:
    extra = {}
    if stage == "zero3":
        # ZeRO-3 + non-reentrant checkpointing with frozen weights (a pitfall: docs/ARCHITECTURE.md
        # "Facts the code relies on"), and an
        # evaluation whose 3 items leave rank 1 a dummy batch (ranks must stay in lockstep).
        extra = {
            "model.checkpointing.vision": "true",
            "model.checkpointing.language": "true",
            "eval.at_end": "true",
            "eval.max_samples": "3",
            "eval.micro_batch": "1",
        }
    return base_sets(
        data,
        out,
        **{"train.max_steps": STEPS, "checkpoint.every_steps": EVERY, "train.deepspeed": stage},
        **extra,
    )


def _reference(data: Path, out: Path, stage: str) -> Path:
    check(run_train(2, _sets(data, out, stage), timeout=300))
    return out


def _kill_and_resume(data: Path, out: Path, stage: str) -> int:
    """SIGKILL the whole job once a checkpoint is complete, resume; returns the resumed step."""
    out.mkdir(parents=True)
    proc = start_train(2, _sets(data, out, stage), out.parent / f"{out.name}.log")
    wait_for(lambda: (out / "checkpoints" / "latest").is_file(), proc, 240, "a checkpoint")
    kill_tree(proc)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert int(latest.split("-")[1]) < STEPS
    check(run_train(2, _sets(data, out, stage), timeout=300))  # --resume auto
    starts = metrics(out, "start")
    assert len(starts) == 2 and starts[1]["resumed_from"].endswith(latest)
    return int(latest.split("-")[1])


def _final_patch_embed(out: Path) -> dict[str, torch.Tensor]:
    return trained_state(out / "checkpoints" / f"step-{STEPS:07d}")


def _assert_same_run(ref: Path, res: Path, resumed_at: int) -> None:
    ref_losses, res_losses = losses_by_step(ref), losses_by_step(res)
    after = [s for s in range(resumed_at + 1, STEPS + 1)]
    assert after, "nothing was trained after the resume"
    # Exact by construction on one machine: the same world size, kernels and thread counts, and
    # the checkpoint restores the fp32 master weights, Adam's moments, every RNG and the sampler.
    # Measured 0 (benchmarks/device_check.py --dry-run step 1, 1 rank, bf16, 2026-12-07); the
    # bound is an ulp of slack, not noise. (A GPU is not bitwise reproducible: there the device
    # check's step 1 records what holds.)
    for s in after:
        assert res_losses[s] == pytest.approx(ref_losses[s], abs=1e-6, rel=0), f"step {s}"
    a, b = _final_patch_embed(ref), _final_patch_embed(res)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k


@pytest.fixture(scope="module")
def zero2_ref(train_data, tmp_path_factory):
    return _reference(train_data, tmp_path_factory.mktemp("z2") / "ref", "zero2")


@pytest.mark.timeout(600)
def test_zero2_kill_and_resume_is_exact(train_data, zero2_ref, tmp_path):
    resumed_at = _kill_and_resume(train_data, tmp_path / "res", "zero2")
    _assert_same_run(zero2_ref, tmp_path / "res", resumed_at)


@pytest.mark.timeout(900)
def test_zero3_kill_and_resume_is_exact(train_data, tmp_path):
    ref = _reference(train_data, tmp_path / "ref", "zero3")
    resumed_at = _kill_and_resume(train_data, tmp_path / "res", "zero3")
    _assert_same_run(ref, tmp_path / "res", resumed_at)
    ev_ref = [r for r in metrics(ref, "eval") if r["task"] == "t1_sex"]
    ev_res = [r for r in metrics(tmp_path / "res", "eval") if r["task"] == "t1_sex"]
    assert ev_ref[0]["count"] == 3 and ev_res[-1] == ev_ref[0]


@pytest.mark.timeout(600)
def test_resume_two_ranks_onto_one(train_data, zero2_ref, tmp_path):
    out = tmp_path / "one"
    start = zero2_ref / "checkpoints" / f"step-{EVERY:07d}"
    check(run_train(1, _sets(train_data, out, "zero2"), resume=str(start), timeout=300))
    assert metrics(out, "start")[0]["resumed_from"] == str(start)
    ref_meta = json.loads(
        (zero2_ref / "checkpoints" / f"step-{STEPS:07d}" / "meta.json").read_text()
    )
    one_meta = json.loads((out / "checkpoints" / f"step-{STEPS:07d}" / "meta.json").read_text())
    # Same data position and global batch: the sampler stands where the 2-rank run's did.
    assert one_meta["sampler"]["consumed"] == ref_meta["sampler"]["consumed"]
    assert one_meta["sampler"]["epoch"] == ref_meta["sampler"]["epoch"]
    assert one_meta["world_size"] == 1 and ref_meta["world_size"] == 2
    # The first step after the resume runs the restored weights on the same samples: the same
    # loss up to reduction order. Later steps drift a little (bf16, another reduction order,
    # amplified by Adam early in training), but stay on the same trajectory.
    # Bounds: 10x the largest difference measured under ATEN_CPU_CAPABILITY=default / avx2 /
    # avx512 on one AMD EPYC with AVX-512 (2026-12-07), relative:
    #   first resumed step loss   4.5e-8 / 5.8e-8 / 0       -> 1e-5, 170x rather than 10x: the
    #     run is bf16, so a CPU that rounds one activation the other way moves this step more
    #     than the reduction order measured here does (not seen, not ruled out); a resume bug
    #     (another sample, stale weights) moves it by 1e-2 or more
    #   any resumed step loss     1.4e-3 / 2.8e-3 / 2.6e-3  -> 3e-2
    #   final patch-embed weights 2.3e-3 / 3.8e-3 / 3.4e-3  -> 4e-2 (largest tensor, |a-b|/|a|)
    ref_losses, one_losses = losses_by_step(zero2_ref), losses_by_step(out)
    assert sorted(one_losses) == list(range(EVERY + 1, STEPS + 1))
    rels = {s: abs(one_losses[s] - ref_losses[s]) / abs(ref_losses[s]) for s in one_losses}
    print(f"2->1 first-step loss rel diff: {rels[EVERY + 1]:.3e}")
    print(f"2->1 any-step loss rel diff: {max(rels.values()):.3e}")
    assert one_losses[EVERY + 1] == pytest.approx(ref_losses[EVERY + 1], rel=1e-5)
    for s in one_losses:
        assert one_losses[s] == pytest.approx(ref_losses[s], rel=3e-2), f"step {s}"
    a, b = _final_patch_embed(zero2_ref), _final_patch_embed(out)
    print("2->1 losses", ref_losses, one_losses)
    w_rel = {k: float((a[k] - b[k]).norm() / a[k].norm()) for k in a}
    print(f"2->1 weights rel diff: {max(w_rel.values()):.3e}")
    for k in a:
        assert w_rel[k] < 4e-2, k
