"""The RNG checkpoint part (umbrella_ds/train/checkpoint.py ``RankRng``) keeps the current CUDA
device's generator only, so a process that sees fewer devices on resume (per-task GPU binding)
still loads it; files written before, with every visible device's generator in a list, still
load (the entry of the device that rank used, its node-local rank). CUDA is played on the CPU:
``torch.cuda``'s RNG functions are replaced by a fake holding one generator state per device."""

from __future__ import annotations

import random

import pytest
import torch

from umbrella_ds.train import checkpoint as ckpt


class FakeCuda:
    """``n`` devices, the current one ``current``; states are distinct uint8 tensors."""

    def __init__(self, monkeypatch, n: int, current: int) -> None:
        self.states = [torch.full((16,), 10 + d, dtype=torch.uint8) for d in range(n)]
        self.current = current
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get)
        monkeypatch.setattr(
            torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in self.states]
        )
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set)

    def get(self, device="cuda"):
        return self.states[self.current].clone()

    def set(self, state, device="cuda"):
        self.states[self.current] = state.clone()


def _round_trip(tmp_path, state: dict, rank: int, device_slot: int) -> None:
    """``state`` written as rank ``rank``'s RNG file, then loaded by ``RankRng``."""
    step = tmp_path / "step-0000003"
    step.mkdir(exist_ok=True)
    torch.save(state, step / f"rng-rank{rank}.pt")
    found = ckpt.Found(step, {"step": 3, "config": {"train": {"seed": 0}}})
    ckpt.RankRng(rank, device_slot=device_slot).load(found, same_world=True)


def test_saves_the_current_device_generator_only(tmp_path, monkeypatch):
    cuda = FakeCuda(monkeypatch, n=8, current=5)
    (tmp_path / "step-0000003").mkdir()
    ckpt.RankRng(5).save(tmp_path, "step-0000003")
    state = torch.load(tmp_path / "step-0000003" / "rng-rank5.pt", weights_only=True)
    assert torch.equal(state["cuda"], torch.full((16,), 15, dtype=torch.uint8))  # device 5's
    # resumed in a process that sees one device (srun --gpus-per-task=1): it gets that stream
    bound = FakeCuda(monkeypatch, n=1, current=0)
    _round_trip(tmp_path, state, rank=5, device_slot=5)
    assert torch.equal(bound.states[0], cuda.states[5])


def test_loads_files_holding_every_devices_generator(tmp_path, monkeypatch):
    """The earlier format: a list over the visible devices; rank 2 trained on device 2."""
    legacy = FakeCuda(monkeypatch, n=4, current=2)
    random.seed(7)
    state = {**ckpt.rng_state(), "cuda": torch.cuda.get_rng_state_all()}
    expect_py = random.random()
    random.seed(0)
    bound = FakeCuda(monkeypatch, n=1, current=0)  # fewer devices on resume
    _round_trip(tmp_path, state, rank=2, device_slot=2)
    assert torch.equal(bound.states[0], legacy.states[2])
    assert random.random() == expect_py  # the other streams load as before
    same = FakeCuda(monkeypatch, n=4, current=2)  # the same layout: device 2 gets its own
    same.states[2] = torch.zeros(16, dtype=torch.uint8)
    _round_trip(tmp_path, state, rank=2, device_slot=2)
    assert torch.equal(same.states[2], legacy.states[2])


def test_a_list_without_this_ranks_device_is_refused(tmp_path, monkeypatch):
    FakeCuda(monkeypatch, n=2, current=0)
    state = {**ckpt.rng_state(), "cuda": torch.cuda.get_rng_state_all()}
    with pytest.raises(ckpt.CheckpointError, match=r"holds 2 CUDA generators; .* number 3"):
        _round_trip(tmp_path, state, rank=3, device_slot=3)


def test_a_cpu_run_has_no_cuda_entry(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "cuda" not in ckpt.rng_state()
