"""Checkpoint contents: only the trainable tensors, a recorded size, latest/keep_last, refusal of
a conflicting fingerprint (a changed micro-batch is not one), and the start/train/eval records of
metrics.jsonl."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.training import base_sets, check, metrics, run_train

from umbrella_ds.train.checkpoint import dir_size

pytestmark = pytest.mark.multiproc


@pytest.mark.timeout(400)
def test_only_trainable_state_is_saved(fp32_run):
    root = fp32_run / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-0000004"
    assert sorted(p.name for p in root.glob("step-*")) == [
        "step-0000003",
        "step-0000004",
    ]  # keep_last 2
    step = root / "step-0000004"
    meta = json.loads((step / "meta.json").read_text())
    assert meta["trainable"] == sorted(meta["trainable"]) and len(meta["trainable"]) == 3
    assert all(".embeddings." in n for n in meta["trainable"])
    module = torch.load(
        step / "mp_rank_00_model_states.pt", weights_only=False, map_location="cpu"
    )["module"]
    assert sorted(module) == meta["trainable"]  # no frozen weight in the checkpoint
    assert meta["size_bytes"] == dir_size(step) - (step / "meta.json").stat().st_size
    # fp32 run: module copy + master weights + two Adam moments of the trainable tensors, plus
    # small RNG/pickle overhead; the frozen weights alone (248,640 x 4 bytes) would not fit.
    n_trainable = sum(t.numel() for t in module.values())
    assert 16 * n_trainable < meta["size_bytes"] < 16 * n_trainable + 100_000
    assert {f.name for f in step.glob("rng-rank*.pt")} == {"rng-rank0.pt", "rng-rank1.pt"}
    rng = torch.load(step / "rng-rank1.pt", weights_only=True)
    assert set(rng) >= {"python", "numpy", "torch"}
    assert meta["sampler"]["consumed"] == meta["consumed_samples"] and meta["world_size"] == 2


def test_metrics_records(fp32_run):
    start = metrics(fp32_run, "start")[0]
    assert [r["rank"] for r in start["ranks"]] == [0, 1] and all(r["host"] for r in start["ranks"])
    train = metrics(fp32_run, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        for k in (
            "epoch",
            "loss",
            "lr",
            "grad_norm",
            "samples_per_s",
            "tokens_per_s",
            "data_wait_frac",
        ):
            assert r[k] is not None, k
        assert r["mfu"] is None  # CPU
    ev = [r for r in metrics(fp32_run, "eval") if r["task"] == "t1_sex"]
    assert ev and 0.0 <= ev[0]["accuracy"] <= 1.0 and ev[0]["count"] == 10


@pytest.mark.timeout(300)
def test_conflicting_fingerprint_is_refused(fp32_run, train_data, tmp_path):
    sets = base_sets(
        train_data,
        tmp_path / "x",
        **{"train.max_steps": 6, "train.lr": 2e-3, "train.bf16": "false"},
    )
    proc = run_train(1, sets, resume=str(fp32_run), timeout=240)
    check(proc, expect=1)
    assert (
        "fingerprint mismatch" in proc.stdout + proc.stderr
        and "config" in proc.stdout + proc.stderr
    )


@pytest.mark.timeout(300)
def test_resume_with_another_micro_batch_is_accepted(fp32_run, train_data, tmp_path):
    """train.micro_batch is out of the config fingerprint (same losses, same data order): the
    same global batch in smaller micro-batches (accumulation 2 instead of 1) resumes."""
    out = tmp_path / "x"
    sets = base_sets(
        train_data,
        out,
        **{"train.max_steps": 5, "train.micro_batch": 8, "train.bf16": "false"},
    )
    check(run_train(2, sets, resume=str(fp32_run), timeout=240))
    assert [r["step"] for r in metrics(out, "train")] == [5]
    meta = json.loads((out / "checkpoints" / "step-0000005" / "meta.json").read_text())
    assert meta["config"]["train"]["micro_batch"] == 8 and meta["fingerprint_scheme"] == 2


@pytest.mark.timeout(400)
def test_no_shared_memory_left_behind(fp32_run_and_shm):
    """DeepSpeed's CPU comm op maps a 66 MB /dev/shm segment per rank and never unlinks it;
    env.release_deepspeed_shm must, or every run leaks RAM until the machine thrashes (the
    segments new after the shared 2-rank run: conftest.fp32_run_and_shm)."""
    _, left_behind = fp32_run_and_shm
    assert left_behind == set()
