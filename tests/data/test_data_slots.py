"""Reused batch slots: the same batches bit for bit, a dead worker and a slot never released are
errors naming the worker, a config shared memory cannot hold is refused."""

from __future__ import annotations

import os
import signal
from functools import partial

import numpy as np
import pytest
import torch
from test_data_loader import TPI, real_dataset

from umbrella_ds.config import ConfigError, DataConfig
from umbrella_ds.data import ResumableSampler, build_loader, collate_train, slots
from umbrella_ds.data.loader import LoaderWorkerError
from umbrella_ds.shards import open_dataset
from umbrella_ds.train import inputs as inputs_module

MB = 2


def _collate(ds):
    return partial(
        collate_train, pad_id=0, image_token_id=ds.renderer.image_token_id, tokens_per_image=TPI
    )


def _pool(ds, cohort_6, workers, gas, prefetch=2, **kw):
    layouts = slots.image_layouts(ds.tasks, open_dataset(cohort_6 / "shards"), MB, ds.series_length)
    return slots.SlotPool(layouts, workers, slots.slots_per_worker(gas, workers, prefetch), **kw)


def _loader(ds, workers, pool=None, epoch=1, prefetch=2):
    sampler = ResumableSampler(len(ds), world_size=1, rank=0, seed=1, global_batch_size=MB)
    sampler.set_epoch(epoch)
    return build_loader(
        ds, sampler, _collate(ds), batch_size=MB, num_workers=workers, prefetch_factor=prefetch,
        pin_memory=True, persistent_workers=True, seed=1, pool=pool,
    )  # fmt: skip


def _snapshot(batch):
    """A batch's content, copied (a slot's views change once it is released)."""
    out = {k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)}
    out.update({f"img:{m}": t.clone() for m, t in batch["images"].items()})
    out.update({f"pos:{m}": t.clone() for m, t in batch["image_positions"].items()})
    out["task_ids"] = list(batch["task_ids"])
    return out


@pytest.mark.timeout(240)
def test_slot_batches_equal_the_plain_path_bitwise_over_epochs(cohort_6):
    """Two workers, accumulation 3 (the engine's fetch-all-then-release), two epochs: far more
    batches than slots, so every slot is reused, and each batch equals the plain loader's."""
    ds = real_dataset(cohort_6)
    gas = 3
    pool = _pool(ds, cohort_6, workers=2, gas=gas)
    assert pool.per_worker == 2 + 2
    loader = _loader(ds, 2, pool)
    seen = 0
    for epoch in (1, 2):
        ref = [_snapshot(b) for b in _loader(ds, 0, epoch=epoch)]
        loader.sampler.set_epoch(epoch)
        it = iter(loader)
        got = []
        while True:
            step = [b for _, b in zip(range(gas), it)]
            if not step:
                break
            got.extend(_snapshot(b) for b in step)
            for b in step:  # after the "backward"
                slots.release(b)
        assert len(got) == len(ref) > 0
        for a, b in zip(ref, got):
            assert a.keys() == b.keys()
            for k in a:
                if k == "task_ids":
                    assert a[k] == b[k]
                else:
                    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
                    bits = [t.contiguous().view(torch.uint8) for t in (a[k], b[k])]
                    assert torch.equal(*bits), k
        seen += len(got)
    assert seen > pool.per_worker * pool.num_workers  # every slot reused
    # the series keeps the layout the patch embedding takes: (N, D, H, W, T), time-first in memory
    rs = next(b for b in _loader(ds, 0) if "rsfMRI" in b["images"])["images"]["rsfMRI"]
    assert rs.shape[1:] == (8, 8, 8, 4) and rs.stride()[-1] == 8 * 8 * 8


@pytest.mark.timeout(180)
def test_a_killed_worker_is_named(cohort_6):
    ds = real_dataset(cohort_6)
    loader = _loader(ds, 1, _pool(ds, cohort_6, workers=1, gas=1))
    it = iter(loader)
    slots.release(next(it))
    worker = loader.loader._iterator._workers[0]
    with pytest.raises(LoaderWorkerError, match=rf"loader worker 0 \(pid {worker.pid}\) died"):
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(30)  # PyTorch's SIGCHLD handler raises here, or the next fetch does
        for b in it:
            slots.release(b)


@pytest.mark.timeout(180)
def test_a_slot_never_released_is_an_error_naming_the_worker(cohort_6):
    ds = real_dataset(cohort_6)
    pool = _pool(ds, cohort_6, workers=1, gas=1, prefetch=1, wait_s=2)
    assert pool.per_worker == 2
    loader = _loader(ds, 1, pool, prefetch=1)
    with pytest.raises(slots.SlotTimeoutError, match="loader worker 0: none of its 2 batch slots"):
        list(loader)  # never released


def test_a_pool_shared_memory_cannot_hold_is_refused(cohort_6, monkeypatch):
    ds = real_dataset(cohort_6)
    data = DataConfig(shards=str(cohort_6 / "shards"), num_workers=2, prefetch_factor=2)
    pool = inputs_module.slot_pool(ds, MB, 4, data)
    # 2 workers x (ceil(4/2) + 2) slots; a micro-batch holds MB T1 (8^3), MB rsfMRI (4x8^3) and,
    # for the T3 tasks, 2 x MB T1
    assert pool.per_worker == 4 and pool.layouts["T1"][0] == 2 * MB
    monkeypatch.setattr(inputs_module, "_shm_free_bytes", lambda: pool.nbytes - 1)
    with pytest.raises(ConfigError, match=r"^data\.num_workers: 2 workers x 4 batch slots"):
        inputs_module.slot_pool(ds, MB, 4, data)
    assert inputs_module.slot_pool(ds, MB, 4, DataConfig(num_workers=0)) is None


def test_read_into_equals_read(cohort_6):
    reader = open_dataset(cohort_6 / "shards")
    s = reader.subjects[0]
    vol = np.empty(reader.shape("T1"), np.float16)
    assert reader.read(s, "T1", out=vol) is vol
    assert np.array_equal(vol, reader.read(s, "T1"))
    win = np.empty((4, *reader.shape("rsfMRI")), np.float16)
    view = reader.read_window(s, "rsfMRI", 3, 4, out=win)
    assert np.shares_memory(view, win) and np.array_equal(
        view, reader.read_window(s, "rsfMRI", 3, 4)
    )
    with pytest.raises(ValueError, match="out must be a C-contiguous float16"):
        reader.read(s, "T1", out=np.empty((2, 2, 2), np.float16))


def test_a_slot_released_after_a_gpu_copy_waits_for_its_event():
    """The CUDA path without a GPU: a release with the copy's event frees the slot only once the
    event has been waited on (before the next fetch), never at the release call."""

    class Event:
        waited = False

        def synchronize(self):
            self.waited = True

    pool = slots.SlotPool({"T1": (2, 4, 4, 4)}, num_workers=1, per_worker=2)
    assert pool.acquire(0) == 0 and pool.acquire(0) == 1
    event = Event()
    pool.release(0, 1, copied=event)
    assert pool.free.tolist() == [[0, 0]]
    pool.release(0, 0)
    assert pool.free.tolist() == [[1, 0]]
    pool.settle()
    assert event.waited and pool.free.tolist() == [[1, 1]]
