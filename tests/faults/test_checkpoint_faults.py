"""Checkpoint faults: a save killed before its completion marker, a disk that fills during a save,
and trainable-only checkpoints of a model whose frozen LM head is tied to the embeddings.

Each case really induces the fault: ``UMBRELLA_TEST_DIE_DURING_SAVE`` makes rank 0 ``os._exit(137)``
inside ``Checkpointer.save`` after every rank wrote its files but before ``meta.json``/``latest``;
the disk is a 2 MiB tmpfs mounted over ``OUT/checkpoints`` and filled once the first checkpoint
is complete. (Killing the whole job after a complete checkpoint: tests/train/test_train_resume.py.)
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers.faults import training_job
from helpers.training import base_sets, check, env, metrics, run_train, wait_for

from umbrella_ds.model.presets import get_preset
from umbrella_ds.train.checkpoint import DIE_DURING_SAVE_ENV, frozen_names, resolve
from umbrella_ds.train.trained import trained_state

pytestmark = pytest.mark.multiproc


def _latest(out: Path) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()


@pytest.mark.timeout(400)
def test_kill_during_save_keeps_previous_checkpoint_which_resumes(train_data, tmp_path):
    out = tmp_path / "run"
    sets = base_sets(train_data, out, **{"train.max_steps": 6, "checkpoint.every_steps": 2})
    killed = run_train(2, sets, timeout=240, environ=env(**{DIE_DURING_SAVE_ENV: "4"}))
    assert killed.returncode != 0, killed.stdout[-3000:]
    root = out / "checkpoints"
    assert _latest(out) == "step-0000002"
    half = root / "step-0000004"
    assert half.is_dir() and any(half.iterdir()), "the fault did not hit mid-save"
    assert not (half / "meta.json").exists()
    assert resolve(out) == root / "step-0000002"
    assert set(trained_state(root / "step-0000002"))  # the previous checkpoint loads
    # --resume auto restarts from step 2 (never the half-written step 4) and finishes.
    check(run_train(2, sets, timeout=240))
    assert metrics(out, "start")[-1]["resumed_from"].endswith("step-0000002")
    assert _latest(out) == "step-0000006"
    assert (half / "meta.json").is_file()  # step 4 was rewritten, completely, by the rerun


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> contextlib.AbstractContextManager[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(path: Path) -> None:
    """Leave no free page on the filesystem of ``path`` (tmpfs allocates whole pages)."""
    with open(path / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)


@pytest.mark.timeout(300)
def test_disk_full_during_save_is_a_clear_error_previous_intact(train_data, tmp_path):
    out = tmp_path / "run"
    sets = base_sets(train_data, out, **{"train.max_steps": 100000, "checkpoint.every_steps": 3})
    with _tmpfs(out / "checkpoints", "2m") as ckpts:
        with training_job(1, sets, tmp_path / "run.log") as proc:
            wait_for(lambda: (ckpts / "latest").is_file(), proc, 200, "a first checkpoint")
            _fill(ckpts)
            code = proc.wait(timeout=120)
        text = (tmp_path / "run.log").read_text()
        assert code != 0, text[-3000:]
        assert "writing checkpoint" in text and "failed" in text, text[-3000:]
        assert "the filesystem is full" in text, text[-3000:]
        latest = _latest(out)
        assert (ckpts / latest / "meta.json").is_file()
        (ckpts / "filler").unlink()
        assert f"still names {latest}" in text, text[-3000:]
        assert set(trained_state(ckpts / latest))  # loads
        incomplete = [p for p in ckpts.glob("step-*") if not (p / "meta.json").is_file()]
        assert incomplete, "the disk filled elsewhere than in a save"
        assert resolve(out) == ckpts / latest


def _tied_model_dir(root: Path) -> Path:
    """The tiny preset with tie_word_embeddings=True, as a local model directory."""
    preset = get_preset("tiny")
    config = preset.make_config()
    config.tie_word_embeddings = True
    config.text_config.tie_word_embeddings = True
    config.save_pretrained(root)
    for f in preset.tokenizer_dir.iterdir():
        shutil.copy(f, root / f.name)
    return root


@pytest.mark.timeout(300)
def test_tied_frozen_lm_head_is_not_saved(train_data, tmp_path):
    model_dir = _tied_model_dir(tmp_path / "tied")
    out = tmp_path / "run"
    sets = base_sets(
        train_data,
        out,
        **{
            "model.path": model_dir,
            "model.init": "random",
            "train.max_steps": 1,
            "checkpoint.every_steps": 1,
        },
    )
    check(run_train(1, sets, timeout=240))
    step = out / "checkpoints" / "step-0000001"
    meta = json.loads((step / "meta.json").read_text())
    module = torch.load(step / "mp_rank_00_model_states.pt", weights_only=True, map_location="cpu")
    keys = sorted(module["module"])
    assert "lm_head.weight" not in keys and not any("embed_tokens" in k for k in keys), keys
    assert keys == meta["trainable"]


def test_frozen_names_lists_every_tied_alias():
    from transformers import LlavaForConditionalGeneration

    config = get_preset("tiny").make_config()
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = True
    model = LlavaForConditionalGeneration(config)
    assert model.lm_head.weight is model.get_input_embeddings().weight  # really tied
    for p in model.parameters():
        p.requires_grad_(False)
    names = frozen_names(model)
    assert {"lm_head.weight", "model.language_model.embed_tokens.weight"} <= names
    assert "lm_head.weight" not in {n for n, _ in model.named_parameters()}  # why it is needed
