"""The one atomic write (umbrella_ds.io) and the checkpoint format check on load."""

from __future__ import annotations

import json

import pytest

from umbrella_ds.config import CheckpointConfig
from umbrella_ds.io import atomic_path, atomic_write_text
from umbrella_ds.train.checkpoint import (
    FORMAT_VERSION,
    Checkpointer,
    CheckpointPathError,
    Parts,
    read_meta,
)


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "plot.png"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target, ".png") as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]


def _step(tmp_path, version):
    step = tmp_path / "step-0000001"
    step.mkdir()
    (step / "meta.json").write_text(json.dumps({"format": version, "step": 1}))
    return step


def test_checkpoint_format_is_checked_on_load(tmp_path):
    for name in ("ok", "new", "old"):
        (tmp_path / name).mkdir()
    assert read_meta(_step(tmp_path / "ok", FORMAT_VERSION))["step"] == 1
    with pytest.raises(CheckpointPathError, match="newer umbrella-ds"):
        read_meta(_step(tmp_path / "new", FORMAT_VERSION + 1))
    with pytest.raises(CheckpointPathError, match="older than this umbrella-ds reads"):
        read_meta(_step(tmp_path / "old", 0))


def test_part_names_cannot_shadow_the_checkpoints_own_keys(tmp_path):
    class Nothing:
        def state_dict(self):
            return None

        def load_state_dict(self, state):
            pass

    with pytest.raises(ValueError, match="reserved"):
        Checkpointer(CheckpointConfig(), tmp_path, 0, 1, Parts(files={}, state={"tag": Nothing()}))
