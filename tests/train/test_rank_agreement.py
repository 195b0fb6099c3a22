"""Ranks agree before they act (umbrella_ds/train/checkpoint.py ``rank0_decides``): what a save or
a resume reads from the file system is rank 0's answer on every rank.

On NFS each node caches file attributes, so rank 1 may still see no ``meta.json`` that rank 0
sees, or the reverse. A rank that decides alone skips a save (or a load) the others enter, and
they wait in its barriers until the collective timeout. The fake collective below plays rank 1
of two with a file system that disagrees with rank 0; the gloo test really starts two ranks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from umbrella_ds.config import CheckpointConfig
from umbrella_ds.train import checkpoint as ckpt
from umbrella_ds.train.checkpoint import Checkpointer, Parts, find, rank0_decides


class Rank1Of2:
    """torch.distributed as rank 1 of 2 sees it; broadcasts deliver ``rank0_answers`` in turn."""

    def __init__(self, monkeypatch, *rank0_answers) -> None:
        self.answers = list(rank0_answers)
        self.barriers = 0
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
        monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
        monkeypatch.setattr(dist, "barrier", self.barrier)
        monkeypatch.setattr(dist, "broadcast_object_list", self.broadcast)

    def barrier(self, *args, **kwargs) -> None:
        self.barriers += 1

    def broadcast(self, box: list, src: int = 0, **kwargs) -> None:
        assert src == 0
        box[0] = self.answers.pop(0)


class Files:
    """A file part that records the steps it wrote."""

    def __init__(self) -> None:
        self.saved: list[str] = []

    def save(self, root: Path, tag: str) -> None:
        (root / tag).mkdir(parents=True, exist_ok=True)  # as DeepSpeed's save does
        self.saved.append(tag)

    def load(self, found, same_world: bool) -> None:
        pass


def _checkpointer(root: Path, rank: int, files: Files) -> Checkpointer:
    return Checkpointer(CheckpointConfig(), root, rank, 2, Parts(files={"f": files}, state={}))


def _complete(root: Path, step: int) -> Path:
    step_dir = root / ckpt.step_tag(step)
    step_dir.mkdir(parents=True)
    (step_dir / ckpt.META).write_text(json.dumps({"format": 1, "step": step, "world_size": 2}))
    return step_dir


def test_save_when_rank0_has_not_saved_though_this_rank_sees_meta(tmp_path, monkeypatch):
    """Rank 1 sees a stale meta.json (rank 0 removed an incomplete attempt and is saving): it
    must write its files and enter the barriers rank 0 enters, not return early."""
    _complete(tmp_path, 5)
    fake = Rank1Of2(monkeypatch, (True, False))  # rank 0: not saved at step 5
    files = Files()
    _checkpointer(tmp_path, 1, files).save(5)
    assert files.saved == ["step-0000005"] and fake.barriers == 3  # as many as rank 0's save


def test_no_save_when_rank0_has_saved_though_this_rank_sees_nothing(tmp_path, monkeypatch):
    """A signal right after a periodic save: rank 0 sees the complete step, rank 1's cache does
    not yet; rank 1 must skip with rank 0, not enter a save (and its barriers) alone."""
    fake = Rank1Of2(monkeypatch, (True, True))
    files = Files()
    assert _checkpointer(tmp_path, 1, files).save(5) == tmp_path / "step-0000005"
    assert files.saved == [] and fake.barriers == 0


def test_resume_takes_rank0s_checkpoint(tmp_path, monkeypatch):
    """--resume auto: rank 1 sees no ``latest`` yet; it resumes what rank 0 found."""
    found = ckpt.Found(tmp_path / "step-0000004", {"step": 4})
    Rank1Of2(monkeypatch, (True, found))
    assert find("auto", tmp_path) == found
    Rank1Of2(monkeypatch, (True, None))  # and starts fresh where rank 0 does, whatever it sees
    step_dir = _complete(tmp_path, 7)
    (tmp_path / ckpt.LATEST).write_text(step_dir.name + "\n")
    assert find("auto", tmp_path) is None


def test_rank0s_refusal_is_every_ranks(tmp_path, monkeypatch):
    Rank1Of2(monkeypatch, (False, ckpt.CheckpointPathError("/x: not a checkpoint")))
    _complete(tmp_path, 3)
    with pytest.raises(ckpt.CheckpointPathError, match="/x: not a checkpoint"):
        find(str(tmp_path / "step-0000003"), tmp_path)  # valid here, refused on rank 0


def test_rank0_decides_and_broadcasts(monkeypatch):
    sent = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "broadcast_object_list", lambda box, src=0: sent.append(list(box)))
    assert rank0_decides(lambda: "mine") == "mine" and sent == [[(True, "mine")]]
    with pytest.raises(ValueError, match="bad"):
        rank0_decides(lambda: (_ for _ in ()).throw(ValueError("bad")))
    assert sent[1][0][0] is False  # the refusal went to the other ranks before it was raised


def _two_ranks(rank: int, port: int, root: str, results: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        # the file system disagrees: only rank 1 sees a complete step 2
        view = Path(root) / f"rank{rank}"
        if rank == 1:
            _complete(view, 2)
        files = Files()
        _checkpointer(view, rank, files).save(2)
        answer = rank0_decides(lambda: f"rank {rank}")
        Path(results, f"{rank}.json").write_text(json.dumps([files.saved, answer]))
    finally:
        dist.destroy_process_group()


@pytest.mark.multiproc
@pytest.mark.timeout(180)
def test_two_gloo_ranks_follow_rank0(tmp_path):
    from helpers.net import free_port

    out = tmp_path / "results"
    out.mkdir()
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(target=_two_ranks, args=(r, port, str(tmp_path), str(out))) for r in (0, 1)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=150)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a rank hung: the ranks did not agree"
    assert [p.exitcode for p in procs] == [0, 0]
    results = [json.loads((out / f"{r}.json").read_text()) for r in (0, 1)]
    # rank 0 saw no step 2, so both saved it; both got rank 0's answer
    assert results == [[["step-0000002"], "rank 0"], [["step-0000002"], "rank 0"]]
