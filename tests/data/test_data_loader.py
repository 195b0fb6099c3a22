"""InstructionDataset over real shards (synthetic cohort) and the DataLoader with workers."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.data import FakeShards, t1_task, tiny_tokenizer, write_jsonl

from umbrella_ds.data import (
    InstructionDataset,
    Renderer,
    ResumableSampler,
    build_loader,
    collate_train,
    load_instructions,
    resolve_subjects,
)

TPI = {"T1": 4, "rsfMRI": 6}
FRAMES = 12  # the frames of each rsfMRI series in cohort_6 (tests/data/conftest.py)


def real_dataset(cohort_6: Path, *, train: bool = True, renderer=None, **kw) -> InstructionDataset:
    from umbrella_ds.shards import open_dataset

    inst = cohort_6 / "raw" / "instructions"
    tasks = [
        t
        for name in ("t1_sex", "t3_sex", "rsfmri_sex")
        for t in load_instructions(inst / f"{name}_train.jsonl")
    ]
    reader = open_dataset(cohort_6 / "shards")
    tasks, skipped = resolve_subjects(tasks, set(reader.subjects), "error", has=reader.has)
    assert skipped == 0
    renderer = renderer or Renderer(tiny_tokenizer(), TPI, max_length=256)
    kw = {"seed": 5, "series_length": 4, **kw}
    return InstructionDataset(tasks, cohort_6 / "shards", renderer, train=train, **kw)


def test_real_shards_items(cohort_6):
    ds = real_dataset(cohort_6)
    assert ds._shards is None  # nothing opened until the first read
    item = ds[(0, 0)]
    assert ds._shards is not None
    kinds = {m: a.shape for i in range(len(ds)) for m, a in ds[(0, i)]["images"]}
    assert kinds == {"T1": (8, 8, 8), "rsfMRI": (8, 8, 8, 4)}
    assert all(a.dtype == np.float16 for _, a in item["images"])
    # Same key, same item; the epoch changes the draw.
    rs = [i for i in range(len(ds)) if ds.tasks[ds._items[i][0]].images[0].modality == "rsfMRI"]
    starts = [[ds[(e, i)]["window_start"][0] for i in rs] for e in range(4)]
    assert starts[0] == [ds[(0, i)]["window_start"][0] for i in rs]
    assert len({tuple(s) for s in starts}) > 1
    assert all(0 <= s <= FRAMES - 4 for row in starts for s in row)


@pytest.mark.timeout(180)
def test_two_workers_yield_the_same_batches_as_none(cohort_6):
    ds = real_dataset(cohort_6)
    collate = partial(
        collate_train, pad_id=0, image_token_id=ds.renderer.image_token_id, tokens_per_image=TPI
    )

    def batches(workers):
        sampler = ResumableSampler(len(ds), world_size=1, rank=0, seed=1, global_batch_size=3)
        sampler.set_epoch(1)
        loader = build_loader(
            ds, sampler, collate, batch_size=3, num_workers=workers, prefetch_factor=2,
            pin_memory=True, persistent_workers=True, seed=1,
        )  # fmt: skip
        return list(loader)

    ref, par = batches(0), batches(2)
    assert len(ref) == len(par) == len(ds) // 3
    for a, b in zip(ref, par):
        assert a["task_ids"] == b["task_ids"]
        for key in ("input_ids", "attention_mask", "labels", "loss_positions", "loss_targets"):
            assert torch.equal(a[key], b[key]), key
        assert a["images"].keys() == b["images"].keys()
        for m in a["images"]:
            assert torch.equal(a["images"][m], b["images"][m])
            assert torch.equal(a["image_positions"][m], b["image_positions"][m])


# ---- windows and flips (fake shards: rsfMRI voxels hold their frame number) -----------------


def rs_tasks(tmp_path, n=3):
    records = []
    for k in range(n):
        rec = t1_task(f"S{k}", task_id=f"rs{k}")
        rec["images"][0]["modality"] = rec["conversations"][0]["content"][0]["modality"] = "rsfMRI"
        records.append(rec)
    records.append(t1_task("S0", task_id="t1"))
    return load_instructions(write_jsonl(tmp_path / "rs.jsonl", records))


def fake_dataset(tmp_path, **kw):
    renderer = Renderer(tiny_tokenizer(), TPI, max_length=256)
    args = {"train": True, "seed": 0, "series_length": 4, **kw}
    return InstructionDataset(
        rs_tasks(tmp_path), FakeShards(["S0", "S1", "S2"], frames=18), renderer, **args
    )


def test_random_windows_respect_stride_and_eval_is_fixed(tmp_path):
    ds = fake_dataset(tmp_path, window_stride=3)
    seen = set()
    for e in range(6):
        for i in range(3):
            item = ds[(e, i)]
            start = item["window_start"][0]
            arr = item["images"][0][1]
            assert start % 3 == 0 and 0 <= start <= 14
            assert arr[0, 0, 0].tolist() == [start, start + 1, start + 2, start + 3]
            seen.add(start)
    assert len(seen) > 2
    ev = fake_dataset(tmp_path, train=False)
    assert {ev[(e, i)]["window_start"][0] for e in range(3) for i in range(3)} == {0}
    first = fake_dataset(tmp_path, windows="first")
    assert {first[(e, 0)]["window_start"][0] for e in range(5)} == {0}


def test_non_overlapping_windows_expand_the_index(tmp_path):
    ds = fake_dataset(tmp_path, windows="non_overlapping")
    # 3 rsfMRI tasks x (18 // 4 = 4 windows) + 1 T1 task.
    assert len(ds) == 3 * 4 + 1
    starts = [(ds[(0, i)]["task_id"], ds[(0, i)]["window_start"][0]) for i in range(len(ds))]
    assert starts[:4] == [("rs0", 0), ("rs0", 4), ("rs0", 8), ("rs0", 12)]
    assert starts[-1] == ("t1", None)


def test_flips_are_seeded_and_off_in_eval(tmp_path):
    ds = fake_dataset(tmp_path)
    t1_index = len(ds) - 1
    plain = FakeShards(["S0"]).read("S0", "T1")
    draws = [ds[(e, t1_index)]["images"][0][1] for e in range(8)]
    assert any(not np.array_equal(d, plain) for d in draws)
    assert all(np.array_equal(d, ds[(e, t1_index)]["images"][0][1]) for e, d in enumerate(draws))
    assert all(sorted(d.ravel().tolist()) == sorted(plain.ravel().tolist()) for d in draws)
    ev = fake_dataset(tmp_path, train=False)
    assert all(np.array_equal(ev[(e, t1_index)]["images"][0][1], plain) for e in range(4))


@pytest.mark.timeout(180)
def test_batch_feeds_the_tiny_model(cohort_6):
    """Contract check with the model: token counts asked of it, the batch it consumes."""
    from umbrella_ds.model import ModalitySpec, build_model, image_token_id, model_forward_loss
    from umbrella_ds.model import num_image_tokens as model_tokens

    mods = {
        "T1": ModalitySpec(size=(8, 8, 8), patch=(4, 4, 4)),
        "rsfMRI": ModalitySpec(size=(8, 8, 8, 4), patch=(4, 4, 4, 2)),
    }
    model, tok = build_model("tiny", modalities=mods, seed=0)
    tpi = {m: model_tokens(model, m) for m in mods}
    ds = real_dataset(cohort_6)
    ds.renderer = Renderer(tok, tpi, max_length=256)
    ds = InstructionDataset(
        ds.tasks, cohort_6 / "shards", ds.renderer, train=True, seed=0, series_length=4
    )
    assert ds.renderer.image_token_id == image_token_id(model)
    kinds = {ds.tasks[t].task_id.split("_")[0] for t, _ in ds._items}
    picks = [
        next(i for i, (t, _) in enumerate(ds._items) if ds.tasks[t].task_id.startswith(k))
        for k in sorted(kinds)
    ]
    batch = collate_train(
        [ds[(0, i)] for i in picks],
        pad_id=tok.pad_token_id,
        image_token_id=ds.renderer.image_token_id,
        tokens_per_image=tpi,
    )
    assert set(batch["images"]) == {"T1", "rsfMRI"}
    batch["images"] = {m: x.float() for m, x in batch["images"].items()}
    loss, loss_sum = model_forward_loss(model, batch, batch["num_loss_tokens"])
    assert torch.isfinite(loss) and loss_sum > 0
    loss.backward()
