"""``make demo``: 2-rank DeepSpeed training of ``tiny`` on the synthetic cohort, then a report.

    python -m umbrella_ds.demo --config configs/demo.yaml --data runs/demo-data --out runs/demo

``--data`` is what ``make demo-data`` wrote (``raw/`` from ``umbrella-pack synth``, ``shards/`` from
``umbrella-pack build``). Training runs through the deepspeed launcher on CPU
(``DS_ACCELERATOR=cpu``), so the demo uses the same path as a real multi-GPU job. Afterwards
``OUT/report.md`` (final loss, evaluation metrics, steps, time, checkpoint size, parameter table)
and ``OUT/loss.png`` are written from ``OUT/metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TRAIN_SCRIPT = Path(__file__).resolve().parent / "train" / "__main__.py"
REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m umbrella_ds.demo", description=__doc__.split("\n")[0]
    )
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--data", default="runs/demo-data")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--nproc", type=int, default=2, help="ranks (CPU processes)")
    p.add_argument(
        "--set", dest="overrides", action="append", nargs="+", default=[], metavar="KEY=VALUE"
    )
    args = p.parse_args(argv)
    data, out = Path(args.data).resolve(), Path(args.out).resolve()
    instructions = data / "raw" / "instructions"
    for needed in (data / "shards" / "index.json", instructions / "t1_sex_train.jsonl"):
        if not needed.exists():
            print(f"demo: {needed} is missing: run `make demo-data` first", file=sys.stderr)
            return 2
    if (out / "metrics.jsonl").exists():
        print(f"demo: removing the previous demo output in {out}")
        shutil.rmtree(out)
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    cmd = [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus",
        str(args.nproc),
        str(TRAIN_SCRIPT),
        "--config",
        args.config,
        "--resume",
        "none",
        "--set",
        f"output_dir={out}",
        f"data.shards={data / 'shards'}",
        f"data.train=[{instructions / 't1_sex_train.jsonl'}]",
        f"data.eval=[{instructions / 't1_sex_eval.jsonl'}]",
        *(kv for group in args.overrides for kv in group),
    ]
    print("demo:", " ".join(cmd), flush=True)
    t0 = time.time()
    rc = subprocess.run(cmd, env=env).returncode
    elapsed = time.time() - t0
    if rc != 0:
        print(f"demo: training failed with exit status {rc}", file=sys.stderr)
        return rc
    report = write_report(out, elapsed)
    print(report)
    return 0


def read_metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]


def write_report(out: Path, elapsed_s: float) -> str:
    records = read_metrics(out)
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    start = next((r for r in records if r["split"] == "start"), {})
    last_eval_step = max((r["step"] for r in evals), default=None)
    final_evals = [r for r in evals if r["step"] == last_eval_step]
    ckpt_root = out / "checkpoints"
    latest = (ckpt_root / "latest").read_text().strip() if (ckpt_root / "latest").exists() else None
    meta = json.loads((ckpt_root / latest / "meta.json").read_text()) if latest else {}
    plot_loss(train, evals, out / "loss.png")

    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = [
        "# umbrella-ds demo",
        "",
        f"- ranks: {start.get('world_size')} ({', '.join(r['host'] for r in start.get('ranks', []))})",
        f"- optimizer steps: {train[-1]['step'] if train else 0}",
        f"- final train loss (token mean): {fmt(train[-1]['loss']) if train else 'n/a'}",
        f"- wall time (launch to exit): {elapsed_s:.0f} s",
        f"- last checkpoint: {latest} ({meta.get('size_bytes', 0) / 1e6:.2f} MB on disk, "
        "trainable parameters + optimizer state only)",
        "",
        "## Held-out evaluation (greedy generation)",
        "",
        "| task | count | accuracy | balanced accuracy | MAE | Pearson r | unparseable | loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in final_evals:
        lines.append(
            "| "
            + " | ".join(
                fmt(r.get(k))
                for k in (
                    "task",
                    "count",
                    "accuracy",
                    "balanced_accuracy",
                    "mae",
                    "pearson_r",
                    "unparseable",
                    "loss",
                )
            )
            + " |"
        )
    lines += ["", "## Parameters", "", "```", start.get("parameters", "(not recorded)"), "```", ""]
    lines += ["![loss](loss.png)", ""]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    return text


def plot_loss(train: list[dict[str, Any]], evals: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train (token mean)")
    ev = [r for r in evals if r.get("task") == "all" and r.get("loss") is not None]
    if ev:
        ax.plot([r["step"] for r in ev], [r["loss"] for r in ev], "o-", label="held-out")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per supervised token")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
