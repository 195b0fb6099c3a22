"""``umbrella-train --find-micro-batch``: the search, the synthetic batches, and the CLI on tiny."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from umbrella_ds.config import load_config
from umbrella_ds.model import build_model, check_image_tokens, image_token_id, model_forward_loss
from umbrella_ds.train.micro_batch import Trial, search, synthetic_batch

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _fits_up_to(limit: int, seen: list[int]):
    def try_size(mb: int) -> Trial:
        seen.append(mb)
        return Trial(mb, mb <= limit, 0.0, 1.0 if mb <= limit else None)

    return try_size


def test_search_doubles_then_bisects_to_the_largest_fit():
    seen: list[int] = []
    trials = search(_fits_up_to(37, seen), start=1, limit=1024)
    assert seen == [1, 2, 4, 8, 16, 32, 64, 48, 40, 36, 38, 37]
    assert max(t.micro_batch for t in trials if t.fits) == 37


def test_search_stops_at_the_limit_and_when_nothing_fits():
    seen: list[int] = []
    trials = search(_fits_up_to(10**6, seen), start=1, limit=16)
    assert seen == [1, 2, 4, 8, 16] and all(t.fits for t in trials)
    assert not any(t.fits for t in search(_fits_up_to(0, []), start=1, limit=16))


def test_synthetic_batch_is_collate_shaped_and_trains():
    cfg = load_config(
        None,
        ["model.modalities.rsfMRI.size=[32,32,32,8]", "model.modalities.rsfMRI.patch=[8,8,8,4]"],
    )
    model, _ = build_model("tiny", seed=0)
    batch = synthetic_batch(model, cfg, micro_batch=3, text_tokens=20, answer_tokens=4)
    ids = batch["input_ids"]
    assert ids.shape == (3, 20 + 64 + 128)  # text + one T1 (64 tokens) + one rsfMRI (128) each
    check_image_tokens(ids, batch["image_positions"], image_token_id(model))  # raises if wrong
    assert batch["num_loss_tokens"] == 12
    flat = ids.reshape(-1)
    assert (batch["loss_targets"] == flat[batch["loss_positions"] + 1]).all()
    assert not (batch["loss_targets"] == image_token_id(model)).any()
    loss, _ = model_forward_loss(model, batch, batch["num_loss_tokens"], ("T1", "rsfMRI"))
    loss.backward()  # a real forward + backward at these shapes
    with pytest.raises(ValueError, match="answer_tokens"):
        synthetic_batch(model, cfg, 1, text_tokens=4, answer_tokens=4)


def _finder(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "umbrella-train"), "--config", str(REPO / "configs" / "demo.yaml"),
         "--find-micro-batch", *args],
        capture_output=True, text=True, timeout=240, cwd=REPO,
        env={**__import__("os").environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


def _rows(stdout: str) -> list[tuple[int, bool, float | None]]:
    rows = []
    for line in stdout.splitlines():
        m = re.match(r"\s*(\d+)\s+(yes|no)\s+(\S+)\s", line + " ")
        if m:
            peak = None if m.group(3) == "-" else float(m.group(3))
            rows.append((int(m.group(1)), m.group(2) == "yes", peak))
    return rows


@pytest.mark.timeout(300)
def test_cli_reports_the_largest_fit_under_a_memory_cap():
    cap = 0.1
    proc = _finder("--max-memory-gib", str(cap), "--max-micro-batch", "512",
                   "--set", "train.bf16=false")  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = _rows(proc.stdout)
    fits = [mb for mb, ok, _ in rows if ok]
    assert not all(ok for _, ok, _ in rows), proc.stdout  # the cap bit somewhere below 512
    assert all(peak is not None and peak <= cap for _, ok, peak in rows if ok)
    assert any(peak is not None and peak > cap for _, ok, peak in rows if not ok)
    m = re.search(r"largest micro-batch that fits: (\d+) \(([\d.]+) samples/s", proc.stdout)
    assert m and int(m.group(1)) == max(fits) and float(m.group(2)) > 0, proc.stdout
    # bisection closed the gap: the next size up was tried and did not fit
    assert (max(fits) + 1, False) in [(mb, ok) for mb, ok, _ in rows], proc.stdout


@pytest.mark.timeout(300)
def test_cli_without_a_cap_stops_at_max_micro_batch_and_rejects_bad_arguments():
    proc = _finder("--max-micro-batch", "4", "--set", "train.bf16=true")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [mb for mb, ok, _ in _rows(proc.stdout) if ok] == [1, 2, 4]
    assert "largest micro-batch that fits: 4" in proc.stdout
    bad = _finder("--max-micro-batch", "0")
    assert bad.returncode == 2 and "error: --max-micro-batch: must be >= 1" in bad.stderr


def test_cuda_need_adds_the_context_nccl_and_variation_margins_to_the_reserved_peak():
    """The GPU arithmetic, checkable without a GPU: 10 GiB reserved in the finder's process is
    10.5 GiB with the 5% variation, plus 1 GiB of context and 2 GiB of NCCL buffers."""
    from umbrella_ds.train import micro_batch as mbf

    assert mbf.cuda_need(10 * mbf.GIB) == int(13.5 * mbf.GIB)
    assert mbf.cuda_need(0) == 3 * mbf.GIB  # the margins alone: what an empty step would need
    # an 80 GB H100 (79.2 GiB usable): the largest reserved peak that still fits
    fits = (79.2 - 3.0) / 1.05
    assert (
        mbf.cuda_need(int(fits * mbf.GIB))
        <= 79.2 * mbf.GIB
        < mbf.cuda_need(int((fits + 0.1) * mbf.GIB))
    )


def test_memory_cap_is_the_users_then_the_gpus_then_none():
    import torch

    from umbrella_ds.train import micro_batch as mbf

    assert mbf.memory_cap(2.5, torch.device("cpu")) == int(2.5 * mbf.GIB)
    assert mbf.memory_cap(None, torch.device("cpu")) is None  # CPU: bounded by max_micro_batch
