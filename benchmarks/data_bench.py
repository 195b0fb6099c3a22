"""Instruction data path: padding efficiency and loader throughput on a synthetic cohort.

`python -m benchmarks.data_bench [--subjects N] [--batch-size B]` writes
benchmarks/results/data_loader.json. It measures, never asserts:

- padding efficiency = real tokens / tokens in the padded batches, for the synthetic T1 and T3
  sets rendered with the predecessor's image size (T1 96^3, patch 16^3 -> 216 tokens per image),
  with dynamic padding (pad to the longest sample of each micro-batch) vs the predecessor's fixed
  2048 tokens per sample;
- loader samples/s (one epoch of T1 + T3 + rsfMRI tasks from packed shards, collate included)
  with 0, 1 and 2 worker processes, on the small volumes the synthetic cohort has here.
"""

from __future__ import annotations

import argparse
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
)
from umbrella_ds.model import TINY_TOKENIZER_DIR

FIXED_LENGTH = 2048
PREDECESSOR_T1_TOKENS = 216  # 96^3 volume, 16^3 patches
RSFMRI_TOKENS = 1728  # 96^3 x 24 frames, patch (16, 16, 16, 3)


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
    ds: InstructionDataset, workers: int, batch_size: int, tpi: dict[str, int]
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
    n = sum(len(b["task_ids"]) for b in loader)
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subjects", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
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

    config = {
        "subjects": args.subjects,
        "micro_batch": args.batch_size,
        "padding_tokens_per_image": {"T1": PREDECESSOR_T1_TOKENS},
        "loader_volumes": {"T1": [32, 32, 32], "rsfMRI": [32, 32, 32, 8]},
        "loader_tokens_per_image": tpi,
    }
    path = write_result("data_loader", config, figures)
    for key, value in figures.items():
        print(f"{key}: {value:.4g}")
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
