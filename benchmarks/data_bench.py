"""Instruction data path: padding efficiency and loader throughput on a synthetic cohort.

`python -m benchmarks.data_bench [--subjects N] [--batch-size B]` writes
benchmarks/results/data_loader.json. It measures, never asserts:

- padding efficiency = real tokens / tokens in the padded batches, for the synthetic T1 and T3
  sets rendered with the predecessor's image size (T1 96^3, patch 16^3 -> 216 tokens per image),
  with dynamic padding (pad to the longest sample of each micro-batch) vs the predecessor's fixed
  2048 tokens per sample;
- loader samples/s (one epoch of T1 + T3 + rsfMRI tasks from packed shards, collate included)
  with 0, 1 and 2 worker processes, on the small volumes the synthetic cohort has here;
- the feed rate at the GPU benchmark's shapes (`--no-gpu-shapes` skips it): samples/s and MB/s
  that ONE loader worker delivers (read with its checksum, flip augmentation, render, collate) for
  T1 at 96^3 in micro-batches of 64 and 24-frame rsfMRI windows of 96^3 in micro-batches of 8,
  against the limit it must meet: one H100 at the 40% MFU goal consumes about 550 T1 or 60 rsfMRI
  samples/s (DESIGN.md). "workers per GPU" = that demand / the one-worker rate: how many of a GPU
  node's cores the loader needs for a data wait near zero. One worker, because this machine has 2
  cores and the main process needs the other. Measured side by side, alternating over 2 rounds,
  with the data path that `collate.stack_images` and view-returning flips replaced
  (`previous_data_path`).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import write_result
from umbrella_ds.data import (
    InstructionDataset,
    Renderer,
    ResumableSampler,
    build_loader,
    collate_train,
    load_instructions,
)
from umbrella_ds.data import collate as collate_module
from umbrella_ds.model import TINY_TOKENIZER_DIR

FIXED_LENGTH = 2048
PREDECESSOR_T1_TOKENS = 216  # 96^3 volume, 16^3 patches
RSFMRI_TOKENS = 1728  # 96^3 x 24 frames, patch (16, 16, 16, 3)
# What one H100 consumes at the 40% MFU goal (DESIGN.md, issue 10): the feed rate's limit.
GPU_DEMAND = {"T1": 550.0, "rsfMRI": 60.0}
GPU_SHAPES = {  # modality: (grid, micro-batch, tokens per image, task file)
    "T1": ((96, 96, 96), 64, PREDECESSOR_T1_TOKENS, "t1_sex_train.jsonl"),
    "rsfMRI": ((96, 96, 96, 24), 8, RSFMRI_TOKENS, "rsfmri_sex_train.jsonl"),
}


def _pack(root: Path, subjects: int) -> Path:
    pack = [sys.executable, "-m", "data_prep.cli"]
    subprocess.run(
        [*pack, "synth", "--out", str(root / "raw"), "--subjects", str(subjects), "--seed", "0"],
        check=True,
        capture_output=True,
        timeout=600,
    )
    subprocess.run(
        [*pack, "build", "--manifest", str(root / "raw" / "manifest.csv"), "--out", str(root / "shards"),
         "--t1-size", "32", "32", "32", "--rsfmri-size", "32", "32", "32", "--no-progress"],
        check=True,
        capture_output=True,
        timeout=600,
    )  # fmt: skip
    return root


def padding_efficiency(lengths: list[int], batch_size: int, seed: int = 0) -> dict[str, float]:
    """Real/padded tokens in shuffled micro-batches: dynamic vs fixed 2048."""
    order = np.random.default_rng(seed).permutation(len(lengths))
    real = int(sum(lengths))
    padded = 0
    for k in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[k : k + batch_size]]
        padded += max(batch) * len(batch)
    return {"dynamic": real / padded, "fixed_2048": real / (FIXED_LENGTH * len(lengths))}


def loader_rate(
    ds: InstructionDataset, workers: int, batch_size: int, tpi: dict[str, int], epochs: int = 1
) -> float:
    collate = partial(
        collate_train, pad_id=0, image_token_id=ds.renderer.image_token_id, tokens_per_image=tpi
    )
    sampler = ResumableSampler(len(ds), world_size=1, rank=0, seed=0, global_batch_size=batch_size)
    loader = build_loader(
        ds, sampler, collate, batch_size=batch_size, num_workers=workers, prefetch_factor=4,
        pin_memory=True, persistent_workers=True, seed=0,
    )  # fmt: skip
    list(loader)  # warm-up: worker start, first shard opens, page cache
    start = time.perf_counter()
    n = sum(len(b["task_ids"]) for _ in range(epochs) for b in loader)
    return n / (time.perf_counter() - start)


def _previous_stack(arrays: list[np.ndarray]) -> torch.Tensor:
    """The data path before `collate.stack_images`: the dataset made every flipped image
    contiguous (for an rsfMRI window, a transposing copy out of its time-first storage), np.stack
    copied into private memory, and sending the batch from a worker copied it into shared memory.
    Flipped views are the only items with negative strides, so this redoes exactly that."""
    arrays = [np.ascontiguousarray(a) if min(a.strides) < 0 else a for a in arrays]
    return torch.from_numpy(np.stack(arrays))


@contextlib.contextmanager
def previous_data_path() -> Iterator[None]:
    """Swap the data path before `collate.stack_images` in at module level (forked loader
    workers inherit it)."""
    ours = collate_module.stack_images
    collate_module.stack_images = _previous_stack
    try:
        yield
    finally:
        collate_module.stack_images = ours


def gpu_shape_feed(root: Path, tok, subjects: int) -> tuple[dict[str, float], dict[str, float]]:
    """One loader worker's rate at the GPU benchmark's shapes, against one H100's demand, with
    our data path and (alternating, median of 2 rounds each) the one it replaced."""
    from benchmarks.common import repeat_tasks, synth_and_pack

    (t1_grid, *_), (rs_grid, *_) = GPU_SHAPES["T1"], GPU_SHAPES["rsfMRI"]
    raw, shards = synth_and_pack(
        root, subjects, t1_grid, t1_grid, frames=32, rsfmri_shape=rs_grid[:3],
        rsfmri_size=rs_grid[:3], modalities=("T1", "rsfMRI"),
    )  # fmt: skip
    figures: dict[str, float] = {}
    ratio: dict[str, float] = {}
    for modality, (grid, micro, tokens, task_file) in GPU_SHAPES.items():
        src, tasks_file = raw / "instructions" / task_file, root / f"feed_{modality}.jsonl"
        repeat_tasks(src, tasks_file, -(-4 * micro // len(load_instructions(src))))  # 4+ batches
        tpi = {modality: tokens}
        ds = InstructionDataset(
            load_instructions(tasks_file), shards, Renderer(tok, tpi, max_length=FIXED_LENGTH),
            train=True, seed=0, rsfmri_length=grid[3] if len(grid) == 4 else 1, flip=True,
        )  # fmt: skip
        rates: dict[str, list[float]] = {"ours": [], "previous": []}
        for _round in range(2):
            rates["ours"].append(loader_rate(ds, 1, micro, tpi, epochs=2))
            with previous_data_path():
                rates["previous"].append(loader_rate(ds, 1, micro, tpi, epochs=2))
        rate, before = statistics.median(rates["ours"]), statistics.median(rates["previous"])
        mb_per_sample = np.prod(grid) * 2 / 1e6  # float16 voxels
        name = f"{modality} {'x'.join(map(str, grid))}"
        figures[f"{name} mb {micro}: samples/s, 1 worker"] = rate
        figures[f"{name} mb {micro}: samples/s, 1 worker, previous data path"] = before
        figures[f"{name} mb {micro}: MB/s, 1 worker"] = rate * mb_per_sample
        figures[f"{name}: workers per H100 at goal speed"] = GPU_DEMAND[modality] / rate
        ratio[f"{name} feed, ours / previous data path"] = rate / before
    return figures, ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subjects", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--gpu-shapes",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure one worker's feed rate at the GPU benchmark's shapes",
    )
    parser.add_argument("--gpu-shape-subjects", type=int, default=8)
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR))
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="data_bench_") as tmp:
        root = _pack(Path(tmp), args.subjects)
        inst = root / "raw" / "instructions"
        pred = Renderer(
            tok, {"T1": PREDECESSOR_T1_TOKENS, "rsfMRI": RSFMRI_TOKENS}, max_length=FIXED_LENGTH
        )
        for name in ("t1_sex", "t3_sex"):
            tasks = load_instructions(inst / f"{name}_train.jsonl")
            lengths = [len(pred.render_train(t).input_ids) for t in tasks]
            eff = padding_efficiency(lengths, args.batch_size)
            figures[f"{name} mean tokens"] = float(np.mean(lengths))
            figures[f"{name} padding efficiency dynamic"] = eff["dynamic"]
            figures[f"{name} padding efficiency fixed 2048"] = eff["fixed_2048"]

        # Loader throughput on the packed (small) volumes; token counts of the tiny model's specs.
        tpi = {"T1": 64, "rsfMRI": 256}
        tasks = [
            t
            for name in ("t1_sex", "t3_sex", "rsfmri_sex")
            for t in load_instructions(inst / f"{name}_train.jsonl")
        ]
        ds = InstructionDataset(
            tasks, root / "shards", Renderer(tok, tpi, max_length=FIXED_LENGTH),
            train=True, seed=0, rsfmri_length=8,
        )  # fmt: skip
        for workers in (0, 1, 2):
            figures[f"loader samples/s, {workers} workers"] = loader_rate(
                ds, workers, args.batch_size, tpi
            )
        ratio: dict[str, float] = {}
        if args.gpu_shapes:
            feed, ratio = gpu_shape_feed(Path(tmp) / "gpu_shapes", tok, args.gpu_shape_subjects)
            figures.update(feed)

    config = {
        "subjects": args.subjects,
        "micro_batch": args.batch_size,
        "padding_tokens_per_image": {"T1": PREDECESSOR_T1_TOKENS},
        "loader_volumes": {"T1": [32, 32, 32], "rsfMRI": [32, 32, 32, 8]},
        "loader_tokens_per_image": tpi,
        "gpu_shapes": {
            m: {
                "grid": g,
                "micro_batch": mb,
                "tokens_per_image": t,
                "demand_samples_per_s": GPU_DEMAND[m],
            }
            for m, (g, mb, t, _) in GPU_SHAPES.items()
        }
        if args.gpu_shapes
        else None,
        "gpu_shape_subjects": args.gpu_shape_subjects,
    }
    path = write_result("data_loader", config, figures, ratio=ratio)
    for key, value in {**figures, **ratio}.items():
        print(f"{key}: {value:.4g}")
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
