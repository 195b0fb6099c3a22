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
  samples/s (docs/BENCHMARKS.md, the goal). "workers per GPU" = that demand / the one-worker rate: how many of a GPU
  node's cores the loader needs for a data wait near zero. One worker, because this machine has 2
  cores and the main process needs the other. Measured side by side, alternating over 2 rounds:
  the loader with reused batch slots (`umbrella_ds.data.slots`) and the path before them (a
  fresh shared-memory batch per micro-batch);
- with `--data-wait-before DIR`: data_wait_frac of a 1-rank CPU training run with one loader
  worker at the T1 feed shapes, with the code in DIR (before slots) and this code.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

from benchmarks.common import write_result
from umbrella_ds.data import (
    InstructionDataset,
    Renderer,
    ResumableSampler,
    build_loader,
    collate_train,
    load_instructions,
    slots,
)
from umbrella_ds.model import TINY_TOKENIZER_DIR

FIXED_LENGTH = 2048
PREDECESSOR_T1_TOKENS = 216  # 96^3 volume, 16^3 patches
RSFMRI_TOKENS = 1728  # 96^3 x 24 frames, patch (16, 16, 16, 3)
# What one H100 consumes at the 40% MFU goal (docs/BENCHMARKS.md, issue 10): the feed rate's limit.
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


PREFETCH = 4


def slot_pool(ds: InstructionDataset, batch_size: int, workers: int) -> slots.SlotPool:
    """The batch slots a training loader would have at gas 1 (the consumer releases each batch
    as it arrives)."""
    layouts = slots.image_layouts(ds.tasks, ds.shards, batch_size, ds.series_length)
    return slots.SlotPool(layouts, workers, slots.slots_per_worker(1, workers, PREFETCH))


def loader_rate(
    ds: InstructionDataset,
    workers: int,
    batch_size: int,
    tpi: dict[str, int],
    epochs: int = 1,
    pool: slots.SlotPool | None = None,
) -> float:
    """Samples/s through the loader; with a slot ``pool`` every batch is released on arrival."""
    collate = partial(
        collate_train, pad_id=0, image_token_id=ds.renderer.image_token_id, tokens_per_image=tpi
    )
    sampler = ResumableSampler(len(ds), world_size=1, rank=0, seed=0, global_batch_size=batch_size)
    loader = build_loader(
        ds, sampler, collate, batch_size=batch_size, num_workers=workers, prefetch_factor=PREFETCH,
        pin_memory=True, persistent_workers=True, seed=0, pool=pool,
    )  # fmt: skip

    def consume() -> int:
        n = 0
        for b in loader:
            n += len(b["task_ids"])
            slots.release(b)
        return n

    consume()  # warm-up: worker start, first shard opens, page cache
    start = time.perf_counter()
    n = sum(consume() for _ in range(epochs))
    return n / (time.perf_counter() - start)


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
            train=True, seed=0, series_length=grid[3] if len(grid) == 4 else 1, flip=True,
        )  # fmt: skip
        pool = slot_pool(ds, micro, 1)
        rates: dict[str, list[float]] = {"slots": [], "fresh": []}
        for _round in range(2):
            rates["slots"].append(loader_rate(ds, 1, micro, tpi, epochs=2, pool=pool))
            rates["fresh"].append(loader_rate(ds, 1, micro, tpi, epochs=2))
        del pool
        rate, before = statistics.median(rates["slots"]), statistics.median(rates["fresh"])
        mb_per_sample = np.prod(grid) * 2 / 1e6  # float16 voxels
        name = f"{modality} {'x'.join(map(str, grid))}"
        figures[f"{name} mb {micro}: samples/s, 1 worker"] = rate
        figures[f"{name} mb {micro}: samples/s, 1 worker, fresh batch (before slots)"] = before
        figures[f"{name} mb {micro}: MB/s, 1 worker"] = rate * mb_per_sample
        figures[f"{name}: workers per H100 at goal speed"] = GPU_DEMAND[modality] / rate
        ratio[f"{name} feed, slots / fresh batch"] = rate / before
    return figures, ratio


WAIT_STEPS, WAIT_WARMUP = 8, 3


def data_wait(root: Path, tree: Path, tag: str) -> float:
    """Median data_wait_frac (steps after WAIT_WARMUP) of a 1-rank CPU training run of the code
    in ``tree`` with one loader worker at the T1 feed shapes: tiny preset, T1 96^3 / 16^3
    patches, flip on, micro-batch 64, 2 micro-batches per step (both fetched before the first
    forward, so the slots are reused across a step)."""
    from benchmarks.common import REPO, bench_env, deepspeed_cmd, run_logged

    out = root / f"wait-{tag}"
    overrides = [
        f"output_dir={out}", f"data.shards={root / 'shards'}", f"data.train=[{root / 'feed_T1.jsonl'}]",
        "data.eval=[]", "data.flip=true", "data.num_workers=1", "data.max_length=512",
        'model.modalities={"T1": {"size": [96, 96, 96], "patch": [16, 16, 16]}}',
        f"train.max_steps={WAIT_STEPS}", "train.global_batch=128", "train.micro_batch=64",
        "checkpoint.every_steps=0", "eval.at_end=false", "log.every_steps=1",
        "log.tensorboard=false", "log.progress=false",
    ]  # fmt: skip
    args = [
        "--config",
        str(REPO / "configs" / "demo.yaml"),
        "--resume",
        "none",
        "--set",
        *overrides,
    ]
    script = tree / "umbrella_ds" / "train" / "__main__.py"
    run_logged(
        deepspeed_cmd(script, args, 1), root / f"wait-{tag}.log", timeout=1200,
        env=bench_env(PYTHONPATH=str(tree)),
    )  # fmt: skip
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    waits = [r["data_wait_frac"] for r in records if r.get("split") == "train"]
    return statistics.median(waits[WAIT_WARMUP:])


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
    parser.add_argument(
        "--data-wait-before",
        type=Path,
        default=None,
        help="a checkout of the code before batch slots: also measure data_wait_frac of a 1-rank "
        "CPU training run with one loader worker at the T1 feed shapes, that code and this",
    )
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
            train=True, seed=0, series_length=8,
        )  # fmt: skip
        for workers in (0, 1, 2):
            figures[f"loader samples/s, {workers} workers"] = loader_rate(
                ds, workers, args.batch_size, tpi
            )
        ratio: dict[str, float] = {}
        if args.gpu_shapes:
            feed, ratio = gpu_shape_feed(Path(tmp) / "gpu_shapes", tok, args.gpu_shape_subjects)
            figures.update(feed)
            if args.data_wait_before is not None:
                from benchmarks.common import REPO

                root = Path(tmp) / "gpu_shapes"
                waits: dict[str, list[float]] = {"before": [], "slots": []}
                for r in range(2):  # alternating: load from other work hits both alike
                    for tag, tree in (("before", args.data_wait_before), ("slots", REPO)):
                        waits[tag].append(data_wait(root, tree, f"{tag}-{r}"))
                for tag, values in waits.items():
                    key = f"T1 96^3 mb 64, 1-rank CPU run, 1 worker: data_wait_frac, {tag}"
                    figures[key] = statistics.median(values)

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
