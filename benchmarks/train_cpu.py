"""Training throughput on 2 CPU ranks, `tiny` preset: our engine vs the predecessor's stack.

`python -m benchmarks.train_cpu [--steps 20] [--warmup 5] [--pad-to 2048]` writes
benchmarks/results/train_cpu.json. Three runs, one after the other on the same synthetic cohort,
each 2 ranks started by the deepspeed launcher, ZeRO-2 (`ds_configs/zero2.json`), bf16, global
batch 16 = micro-batch 8 x 2 ranks, T1 sex classification:

- ours: `python -m umbrella_ds.train --config configs/demo.yaml` (packed shards, dynamic padding,
  logits only at supervised positions); figures from its metrics.jsonl (`samples_per_s`,
  `tokens_per_s`, `data_wait_frac`) per optimizer step;
- baseline (fewer steps, `--baseline-steps`: each takes seconds):
  `benchmarks/baseline_hf_trainer.py --mode predecessor` (HF Trainer + the same
  DeepSpeed JSON, NIfTI decoded and resized on every access in the main process, every sample
  padded to `--pad-to`, HF's full-vocabulary loss);
- like-for-like: the same HF Trainer with our data path and loss (`--mode like_for_like`), which
  isolates what the engine itself costs or saves.

The T1 sources are 256^3 NIfTI, as FreeSurfer-conformed T1s are; the `tiny` model reads 32^3.
A few subjects are synthesised and their tasks repeated under distinct ids, so an epoch holds
several steps while the per-access decoding cost stays that of real volumes. Per-step rates are
medians over the steps after `--warmup`, pooled over `--pairs` runs of ours and like-for-like,
which alternate so that load from other work on the machine hits both alike. tokens/s counts
non-pad tokens in every run.
Measures, never asserts.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import (
    REPO,
    deepspeed_cmd,
    repeat_tasks,
    run_logged,
    synth_and_pack,
    write_result,
)

BASELINE = Path(__file__).resolve().parent / "baseline_hf_trainer.py"
ENGINE = REPO / "umbrella_ds" / "train" / "__main__.py"
SIZE, PATCH = (32, 32, 32), (8, 8, 8)
RANKS, MICRO, GLOBAL = 2, 8, 16


def ours(
    root: Path, shards: Path, tasks: Path, steps: int, warmup: int, tag: str
) -> dict[str, Any]:
    """One engine run; per-step rates after the warm-up, from its metrics.jsonl."""
    out = root / f"ours-{tag}"
    overrides = [
        f"output_dir={out}", f"data.shards={shards}", f"data.train=[{tasks}]", "data.eval=[]",
        f"train.max_steps={steps}", f"train.global_batch={GLOBAL}", f"train.micro_batch={MICRO}",
        "checkpoint.every_steps=0", "eval.at_end=false", "log.every_steps=1",
        "log.tensorboard=false", "log.progress=false",
    ]  # fmt: skip
    config = str(REPO / "configs" / "demo.yaml")
    args = ["--config", config, "--resume", "none", "--set", *overrides]
    wall = run_logged(deepspeed_cmd(ENGINE, args, RANKS), root / f"ours-{tag}.log", timeout=900)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("split") == "train" and r["step"] > warmup]
    if not train:
        raise RuntimeError(f"{out}/metrics.jsonl has no train records after step {warmup}")
    return {
        "samples_per_s": [r["samples_per_s"] for r in train],
        "tokens_per_s": [r["tokens_per_s"] for r in train],
        "data_wait_frac": [r["data_wait_frac"] for r in train],
        "wall_s": wall,
    }


def baseline(
    root: Path, mode: str, raw: Path, shards: Path, steps: int, warmup: int, pad_to: int, tag: str
) -> dict[str, Any]:
    """One HF Trainer run; per-step rates after the warm-up, from its step end times."""
    result = root / f"{mode}-{tag}.json"
    args = [
        "--mode", mode, "--raw", str(raw), "--shards", str(shards), "--task", "bench",
        "--size", *map(str, SIZE), "--patch", *map(str, PATCH), "--pad-to", str(pad_to),
        "--micro-batch", str(MICRO), "--max-steps", str(steps), "--out", str(result),
    ]  # fmt: skip
    log = root / f"{mode}-{tag}.log"
    wall = run_logged(deepspeed_cmd(BASELINE, args, RANKS), log, timeout=1800)
    rec = json.loads(result.read_text())
    ends = rec["step_ends"]
    durations = [b - a for a, b in itertools.pairwise(ends)][max(0, warmup - 1) :]
    if not durations:
        raise RuntimeError(f"{result}: too few steps ({len(ends)}) after a warm-up of {warmup}")
    samples = rec["samples_per_step"]
    out: dict[str, Any] = {
        "samples_per_s": [samples / d for d in durations],
        "tokens_per_s": [samples * rec["real_tokens_per_sample"] / d for d in durations],
        "wall_s": wall,
        "resolved_ds_config": rec.get("resolved_ds_config"),
    }
    if rec.get("padded_tokens_per_sample"):
        out["padded_tokens_per_s"] = [
            samples * rec["padded_tokens_per_sample"] / d for d in durations
        ]
    return out


def pooled(runs: list[dict[str, Any]], key: str) -> float:
    """Median of the per-step rates of every run together."""
    return statistics.median(v for r in runs for v in r[key])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the medians")
    p.add_argument(
        "--baseline-steps", type=int, default=8, help="steps of the (slow) predecessor run"
    )
    p.add_argument("--baseline-warmup", type=int, default=2)
    p.add_argument(
        "--pairs", type=int, default=2, help="alternating runs of ours and like-for-like"
    )
    p.add_argument(
        "--pad-to", type=int, default=2048, help="the predecessor's fixed sequence length"
    )
    p.add_argument("--subjects", type=int, default=4)
    p.add_argument("--t1-source", type=int, nargs=3, default=(256, 256, 256))
    p.add_argument("--tasks", type=int, default=64, help="train tasks after repetition")
    p.add_argument("--workdir", type=Path, default=None, help="parent of the temporary folder")
    a = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="train_cpu_", dir=a.workdir) as tmp:
        root = Path(tmp)
        raw, shards = synth_and_pack(root, a.subjects, tuple(a.t1_source), SIZE)
        src = raw / "instructions" / "t1_sex_train.jsonl"
        n_src = sum(1 for line in src.read_text().splitlines() if line.strip())
        n_tasks = repeat_tasks(
            src, raw / "instructions" / "bench_train.jsonl", -(-a.tasks // n_src)
        )
        tasks = raw / "instructions" / "bench_train.jsonl"
        # ours and like-for-like alternate, so load from other work hits both alike.
        runs: dict[str, list[dict[str, Any]]] = {"ours": [], "lfl": []}
        for k in range(a.pairs):
            runs["ours"].append(ours(root, shards, tasks, a.steps, a.warmup, str(k)))
            runs["lfl"].append(
                baseline(root, "like_for_like", raw, shards, a.steps, a.warmup, a.pad_to, str(k))
            )
        pred = baseline(
            root, "predecessor", raw, shards, a.baseline_steps, a.baseline_warmup, a.pad_to, "0"
        )

    ours_sps, lfl_sps = pooled(runs["ours"], "samples_per_s"), pooled(runs["lfl"], "samples_per_s")
    pred_sps = pooled([pred], "samples_per_s")
    figures = {
        "ours samples/s": ours_sps,
        "baseline (predecessor) samples/s": pred_sps,
        "like-for-like (HF Trainer, our data path) samples/s": lfl_sps,
        "ours tokens/s": pooled(runs["ours"], "tokens_per_s"),
        "baseline tokens/s (non-pad)": pooled([pred], "tokens_per_s"),
        "baseline tokens/s (padded, computed)": pooled([pred], "padded_tokens_per_s"),
        "like-for-like tokens/s": pooled(runs["lfl"], "tokens_per_s"),
        "ours data-wait share": pooled(runs["ours"], "data_wait_frac"),
        "ours run wall s (each)": statistics.median(r["wall_s"] for r in runs["ours"]),
        "like-for-like run wall s (each)": statistics.median(r["wall_s"] for r in runs["lfl"]),
        "baseline run wall s": pred["wall_s"],
    }
    ratio = {
        "ours / baseline samples/s": ours_sps / pred_sps,
        "ours / like-for-like samples/s": ours_sps / lfl_sps,
        "like-for-like / baseline samples/s": lfl_sps / pred_sps,
    }
    for k, (o, f) in enumerate(zip(runs["ours"], runs["lfl"]), start=1):
        # Each pair ran back to back: its ratio is the least exposed to drifting load.
        pair = statistics.median(o["samples_per_s"]) / statistics.median(f["samples_per_s"])
        ratio[f"ours / like-for-like samples/s, pair {k}"] = pair
    config = {
        "preset": "tiny",
        "ranks": RANKS,
        "launcher": "deepspeed --num_gpus 2 (DS_ACCELERATOR=cpu, gloo)",
        "deepspeed": "ds_configs/zero2.json, bf16",
        "global_batch": GLOBAL,
        "micro_batch": MICRO,
        "t1_source_grid": list(a.t1_source),
        "t1_model_grid": list(SIZE),
        "patch": list(PATCH),
        "subjects": a.subjects,
        "train_tasks": n_tasks,
        "steps": a.steps,
        "runs_each_of_ours_and_like_for_like": a.pairs,
        "per_run_median_samples_per_s": {
            name: [statistics.median(r["samples_per_s"]) for r in rs] for name, rs in runs.items()
        },
        "warmup_steps_excluded": a.warmup,
        "baseline_steps": a.baseline_steps,
        "baseline_warmup_steps_excluded": a.baseline_warmup,
        "baseline_pad_to": a.pad_to,
        "ours_data_workers": 0,
        "baseline_resolved_ds_config": pred.get("resolved_ds_config"),
        "rates": "median of the per-step rates after the warm-up, pooled over the runs of a path",
    }
    path = write_result("train_cpu", config, figures, ratio=ratio)
    for key, value in {**figures, **ratio}.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
