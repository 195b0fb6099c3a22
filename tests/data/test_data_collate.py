"""collate_train / collate_eval: dynamic padding, images by modality, host-built indices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.data import (
    SUBJECT_A,
    SUBJECT_B,
    FakeShards,
    t1_task,
    t3_task,
    tiny_tokenizer,
    write_jsonl,
)

from umbrella_ds.data import (
    IGNORE_INDEX,
    InstructionDataset,
    Renderer,
    collate_eval,
    collate_train,
    load_instructions,
)
from umbrella_ds.data.collate import stack_images

TPI = {"T1": 3, "rsfMRI": 5}
SUBJECTS = [SUBJECT_A, SUBJECT_B, "NDARINV2222BBBB"]


def rs_task():
    rec = t1_task(SUBJECTS[2], answer="male.", task_id="rs_1")
    for part in (rec["images"][0], rec["conversations"][0]["content"][0]):
        part["modality"] = "fMRI"
    return rec


def mixed_t3():
    """rsfMRI reference first, T1 query second."""
    rec = t3_task(SUBJECTS[2], SUBJECT_A, "fMRI")
    rec["task_id"] = "mixed"
    rec["images"][1]["modality"] = rec["conversations"][2]["content"][1]["modality"] = "sMRI"
    return rec


def text_only():
    return {
        "task_id": "text_only",
        "conversations": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
        ],
    }


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    path = write_jsonl(
        tmp_path_factory.mktemp("c") / "x.jsonl",
        [t1_task(SUBJECT_B), t3_task(SUBJECT_A, SUBJECT_B), rs_task(), text_only(), mixed_t3()],
    )
    tasks = load_instructions(path)
    renderer = Renderer(tiny_tokenizer(), TPI, max_length=512)
    kw = {"seed": 0, "series_length": 4, "flip": False}
    shards = FakeShards(SUBJECTS)
    return (
        InstructionDataset(tasks, shards, renderer, train=True, **kw),
        InstructionDataset(tasks, shards, renderer, train=False, **kw),
        renderer,
    )


def collate_kw(renderer):
    return {"pad_id": 0, "image_token_id": renderer.image_token_id, "tokens_per_image": TPI}


def test_mixed_images_and_modalities(datasets):
    ds, _, renderer = datasets
    samples = [ds[(0, i)] for i in range(len(ds))]
    b = collate_train(samples, **collate_kw(renderer))
    assert set(b) == {
        "input_ids", "attention_mask", "labels", "images", "image_positions", "loss_positions",
        "loss_targets", "num_loss_tokens", "num_tokens", "task_ids",
    }  # fmt: skip
    seq = b["input_ids"].shape[1]
    lengths = [len(s["input_ids"]) for s in samples]
    assert seq == max(lengths)  # dynamic padding to the longest sample
    assert b["attention_mask"].sum(1).tolist() == lengths and b["num_tokens"] == sum(lengths)
    assert (b["input_ids"][b["attention_mask"] == 0] == 0).all()
    assert b["images"]["T1"].shape == (4, 4, 5, 6) and b["images"]["T1"].dtype == torch.float16
    assert b["images"]["rsfMRI"].shape == (2, 3, 3, 3, 4)
    flat = b["input_ids"].reshape(-1)
    expected_rows = {"T1": [0, 1, 1, 4], "rsfMRI": [2, 4]}  # sample of each image, in order
    for mod, rows in expected_rows.items():
        pos = b["image_positions"][mod]
        assert pos.dtype == torch.long and pos.numel() == len(rows) * TPI[mod]
        assert (flat[pos] == renderer.image_token_id).all()
        blocks = pos.view(len(rows), TPI[mod])
        assert (blocks // seq)[:, 0].tolist() == rows
        assert ((blocks[:, 1:] - blocks[:, :-1]) == 1).all()
    # Each T1 image lands on its own block: subject index is encoded in the voxels.
    t1_subjects = [int(img.float().min()) for img in b["images"]["T1"]]
    assert t1_subjects == [1, 0, 1, 0]  # t1(B); t3(A, B); mixed (A)
    # In the mixed T3 (sample 4) the rsfMRI comes first, the T1 second: positions keep that order.
    t1_in_4 = b["image_positions"]["T1"].view(4, 3)[3]
    rs_in_4 = b["image_positions"]["rsfMRI"].view(2, 5)[1]
    assert rs_in_4.max() < t1_in_4.min()


def test_loss_positions_match_labels(datasets):
    ds, _, renderer = datasets
    b = collate_train([ds[(0, i)] for i in range(len(ds))], **collate_kw(renderer))
    labels = b["labels"]
    seq = labels.shape[1]
    flat = labels.reshape(-1)
    pos = b["loss_positions"]
    assert b["num_loss_tokens"] == pos.numel() == (labels[:, 1:] != IGNORE_INDEX).sum()
    assert (pos % seq != seq - 1).all()  # never predicts across rows
    assert torch.equal(flat[pos + 1], b["loss_targets"])
    assert torch.equal(b["loss_targets"], b["input_ids"].reshape(-1)[pos + 1])


def test_image_block_mismatch_names_sample(datasets):
    ds, _, renderer = datasets
    bad = dict(ds[(0, 1)])
    ids = np.asarray(bad["input_ids"]).copy()
    ids[np.flatnonzero(ids == renderer.image_token_id)[0]] = 5
    bad["input_ids"] = ids
    with pytest.raises(ValueError, match=r"sample 't3_.*: 5 image tokens but 2 image\(s\).*need 6"):
        collate_train([ds[(0, 0)], bad], **collate_kw(renderer))
    # Two images whose tokens are not in two whole blocks.
    split = dict(ds[(0, 0)])
    ids = np.asarray(split["input_ids"]).copy()
    first = np.flatnonzero(ids == renderer.image_token_id)[0]
    ids[first + 1], ids[first + 4] = 7, renderer.image_token_id
    split["input_ids"] = ids
    with pytest.raises(ValueError, match="contiguous block"):
        collate_train([split], **collate_kw(renderer))


def test_collate_eval_left_pads_and_shifts_positions(datasets):
    _, ev, renderer = datasets
    samples = [ev[(0, i)] for i in range(len(ev))]
    b = collate_eval(samples, **collate_kw(renderer))
    seq = b["prompt_ids"].shape[1]
    lengths = [len(s["prompt_ids"]) for s in samples]
    assert seq == max(lengths)
    for r, n in enumerate(lengths):
        assert (
            b["attention_mask"][r, seq - n :].all() and not b["attention_mask"][r, : seq - n].any()
        )
        assert b["prompt_ids"][r, seq - n :].tolist() == samples[r]["prompt_ids"].tolist()
    flat = b["prompt_ids"].reshape(-1)
    for mod in TPI:
        assert (flat[b["image_positions"][mod]] == renderer.image_token_id).all()
    assert b["target_texts"] == ["female.", "no.", "male.", "Hello.", "no."]
    assert b["subject_ids"][1] == [SUBJECT_A, SUBJECT_B]
    assert b["window_start"][2] == [0]  # eval windows are fixed


# ---- stack_images: one copy, stored layout, shared memory in workers ---------------------------


def _series(seed: int) -> np.ndarray:
    """A (D, H, W, T) view of a time-first array, as the shard reader returns a window."""
    tdhw = np.random.default_rng(seed).standard_normal((4, 3, 5, 6)).astype(np.float16)
    return np.moveaxis(tdhw, 0, -1)


def test_stack_images_series_is_the_model_view_of_time_first_storage():
    arrays = [_series(0), np.flip(_series(1), axis=(0, 2)), np.ascontiguousarray(_series(2))]
    out = stack_images(arrays, series=True)
    assert out.shape == (3, 3, 5, 6, 4) and out.dtype == torch.float16
    assert np.array_equal(out.numpy(), np.stack(arrays))  # same values as a plain stack
    assert out.movedim(-1, 1).is_contiguous()  # stored (N, T, D, H, W): no transpose was made
    volumes = [np.random.default_rng(3).standard_normal((3, 5, 6)).astype(np.float16)] * 2
    t1 = stack_images(volumes, series=False)
    assert t1.is_contiguous() and np.array_equal(t1.numpy(), np.stack(volumes))


class _SeriesItems(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> np.ndarray:
        return np.flip(_series(i), axis=(1,))


def _stack_and_report(items: list[np.ndarray]) -> tuple[torch.Tensor, bool]:
    """Runs in the worker: the batch, and whether it was already in shared memory there."""
    out = stack_images(items, series=True)
    return out, out.is_shared()


def test_stack_images_in_a_worker_writes_shared_memory_directly():
    loader = torch.utils.data.DataLoader(
        _SeriesItems(), batch_size=2, num_workers=1, collate_fn=_stack_and_report
    )
    batches = list(loader)
    assert len(batches) == 2
    for k, (batch, shared_in_worker) in enumerate(batches):
        expected = np.stack([np.flip(_series(i), axis=(1,)) for i in (2 * k, 2 * k + 1)])
        assert np.array_equal(batch.numpy(), expected)
        # written into shared memory by the collate itself, so sending it copied nothing, and
        # it arrives with the time-first strides it was written with
        assert shared_in_worker
        assert batch.movedim(-1, 1).is_contiguous()
    # in the training process itself (no worker) the batch stays in private memory
    assert not stack_images([_series(0)], series=True).is_shared()
