"""Evaluation throughput on CPU: seconds per 100 evaluation items, before and after issue 22 §9.

Before: the evaluation loop of ``--baseline-rev`` (read from git, run against this tree): items
read in the training process, a teacher-forced forward for the loss, then a second forward (the
prefill) and greedy decoding. After: this tree's ``evaluate_set``: batches read and collated by the
training loader's construction (``--workers``), one forward for loss and prefill, eager decoding.
Both run side by side in one process on the same model, data and shards (``tiny``, T1 at 32^3 =
64 image tokens, short ``female.``/``male.`` answers, one rank), alternating, median of
``--repeats``; the same ``max_new_tokens`` for both (and the derived length for the new one).

    python -m benchmarks.eval_bench [--items 100] [--micro-batch 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

from benchmarks.common import REPO, write_result

BASELINE_REV = "1a38f8b"  # main before issue 22 §9 / issue 24 §1


def _old_module(rev: str) -> types.ModuleType:
    src = subprocess.run(
        ["git", "show", f"{rev}:umbrella_ds/train/evaluate.py"],  # its home at BASELINE_REV
        cwd=REPO, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    mod = types.ModuleType("evaluate_baseline")
    exec(compile(src, f"{rev}:evaluate.py", "exec"), mod.__dict__)
    return mod


def _cohort(root: Path, items: int) -> tuple[Path, Path]:
    bin_dir = Path(sys.executable).parent
    raw = root / "raw"
    run = dict(check=True, capture_output=True, timeout=600)
    subprocess.run(
        [bin_dir / "umbrella-pack", "synth", "--out", raw, "--subjects", "20", "--seed", "0",
         "--t1-shape", "40", "40", "40", "--frames", "4", "--rsfmri-shape", "8", "8", "8"],
        **run,
    )  # fmt: skip
    subprocess.run(
        [bin_dir / "umbrella-pack", "build", "--manifest", raw / "manifest.csv", "--out",
         root / "shards", "--workers", "1", "--modalities", "T1", "--t1-size", "32", "32", "32",
         "--no-progress"],
        **run,
    )  # fmt: skip
    tasks = [
        json.loads(x)
        for x in (raw / "instructions" / "t1_sex_train.jsonl").read_text().splitlines()
    ]
    out = root / "eval.jsonl"
    with open(out, "w") as f:
        for i in range(items):
            t = dict(tasks[i % len(tasks)], task_id=f"item{i:04d}")
            f.write(json.dumps(t) + "\n")
    return root / "shards", out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=100)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=8, help="the old default")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--baseline-rev", default=BASELINE_REV)
    args = p.parse_args(argv)

    import torch
    import torch.distributed as dist

    from benchmarks.common import free_port
    from umbrella_ds.config import DataConfig, EvalConfig, ModelConfig
    from umbrella_ds.eval import evaluate as new
    from umbrella_ds.model import build_model
    from umbrella_ds.train.inputs import build_inputs

    old = _old_module(args.baseline_rev)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    with tempfile.TemporaryDirectory() as tmp:
        shards, eval_file = _cohort(Path(tmp), args.items)
        mcfg = ModelConfig()
        model, tok = build_model(
            "tiny", modalities={"T1": {"size": [32, 32, 32], "patch": [8, 8, 8]}}, seed=0
        )
        model.eval()
        data = DataConfig(shards=str(shards), train=[str(eval_file)], eval=[str(eval_file)],
                          allow_overlap=True, windows="first", flip=False)  # fmt: skip
        inputs0 = build_inputs(data, mcfg, model, tok, 0)
        inputs_w = dataclasses.replace(inputs0, num_workers=args.workers)
        kw = dict(rank=0, world_size=1, device=torch.device("cpu"), all_modalities=("T1",), step=0)
        fixed = EvalConfig(max_new_tokens=args.max_new_tokens)
        derived = EvalConfig()
        runs = {
            "before": lambda: old.evaluate_set(model, inputs0, tok, fixed, args.micro_batch, **kw),
            "after_workers0": lambda: new.evaluate_set(
                model, inputs0, tok, fixed, args.micro_batch, **kw
            ),
            f"after_workers{args.workers}": lambda: new.evaluate_set(
                model, inputs_w, tok, fixed, args.micro_batch, **kw
            ),
            f"after_workers{args.workers}_derived": lambda: new.evaluate_set(
                model, inputs_w, tok, derived, args.micro_batch, **kw
            ),
        }
        times: dict[str, list[float]] = {k: [] for k in runs}
        for fn in runs.values():
            fn()  # warm-up
        for _ in range(args.repeats):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    dist.destroy_process_group()
    per100 = {k: sorted(v)[len(v) // 2] * 100 / args.items for k, v in times.items()}
    figures = {f"{k}_s_per_100_items": round(v, 3) for k, v in per100.items()}
    figures.update(
        {f"{k}_speedup": round(per100["before"] / v, 2) for k, v in per100.items() if k != "before"}
    )
    path = write_result("eval", vars(args), figures)
    print(json.dumps(figures, indent=1), "\n", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
