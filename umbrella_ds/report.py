"""``umbrella-report RUN [RUN ...] --out DIR``: several runs side by side.

Reads each ``RUN/metrics.jsonl`` (the training engine's log) and writes

    DIR/loss_curves.png   training loss per step of every run on one axis, evaluation loss beside it
    DIR/report.md         a table of each run's final training loss, and one of its last evaluation
                          (per task: accuracy, balanced accuracy, AUROC, MAE, Pearson r, counts,
                          with 95% intervals where the evaluation recorded them)

A resumed run logs some steps twice (those after its last checkpoint): the later record of a step
wins, which is the trajectory that produced the final weights. A run still being written may end in
a partial line; that last line is skipped with a warning, any other malformed line is an error
naming the file and line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from umbrella_ds.errors import UserError, add_debug_flag, run_main
from umbrella_ds.io import atomic_path, atomic_write_text

log = logging.getLogger("umbrella_ds.report")

METRICS_FILE = "metrics.jsonl"
# (record key, column title) in table order; a column appears when some run has the metric.
EVAL_COLUMNS = (
    ("accuracy", "accuracy"),
    ("balanced_accuracy", "balanced acc."),
    ("auroc", "AUROC"),
    ("mae", "MAE"),
    ("pearson_r", "Pearson r"),
    ("loss", "eval loss"),
)


class ReportError(UserError):
    """A run that cannot be read; the message names the file (exit status 2)."""


@dataclass
class RunMetrics:
    """One run's metrics.jsonl read back: its training curve and evaluation records (named for
    what it holds, not ``Run``: that is the training run's state in `train.engine`)."""

    name: str
    path: Path
    train: dict[int, float | None] = field(default_factory=dict)  # step -> loss
    evals: dict[tuple[int, str], dict[str, Any]] = field(default_factory=dict)  # (step, task)

    @property
    def last_step(self) -> int | None:
        return max(self.train) if self.train else None

    @property
    def final_loss(self) -> float | None:
        return self.train[self.last_step] if self.train else None

    @property
    def last_eval_step(self) -> int | None:
        return max(s for s, _ in self.evals) if self.evals else None

    def last_eval(self) -> dict[str, dict[str, Any]]:
        step = self.last_eval_step
        return {t: r for (s, t), r in sorted(self.evals.items()) if s == step}

    def eval_loss_curve(self) -> list[tuple[int, float]]:
        """Overall evaluation loss per evaluated step (task "all", else the mean over tasks)."""
        by_step: dict[int, dict[str, Any]] = {}
        for (s, t), r in self.evals.items():
            by_step.setdefault(s, {})[t] = r.get("loss")
        curve = []
        for s in sorted(by_step):
            tasks = by_step[s]
            if tasks.get("all") is not None:
                curve.append((s, float(tasks["all"])))
            else:
                vals = [v for v in tasks.values() if v is not None]
                if vals:
                    curve.append((s, sum(vals) / len(vals)))
        return curve


def load_run(path: str | os.PathLike[str], name: str | None = None) -> RunMetrics:
    path = Path(path)
    if not path.exists():
        raise ReportError(f"{path}: no such run directory")
    file = path / METRICS_FILE if path.is_dir() else path
    if not file.is_file():
        raise ReportError(f"{file}: no such file (expected a run directory holding {METRICS_FILE})")
    run = RunMetrics(name or (path.name if path.is_dir() else path.parent.name), path)
    lines = file.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            if n == len(lines):
                log.warning("%s:%d: skipping a partial last line (run still writing?)", file, n)
                continue
            raise ReportError(f"{file}:{n}: malformed record ({exc})") from exc
        split = rec.get("split")
        if split == "train" and "step" in rec:
            run.train[int(rec["step"])] = rec.get("loss")
        elif split == "eval" and "step" in rec:
            run.evals[(int(rec["step"]), str(rec.get("task", "all")))] = rec
    return run


def _names(paths: list[Path]) -> list[str]:
    """Short unique labels: the directory name, with its parent where two runs share a name."""
    base = [p.name or str(p) for p in paths]
    return [
        f"{p.parent.name}/{b}" if base.count(b) > 1 else b for p, b in zip(paths, base, strict=True)
    ]


def _fmt(value: Any, ci: list[float] | None = None) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        text = f"{value:.4g}"
    else:
        text = str(value)
    if ci:
        text += f" [{ci[0]:.3g}, {ci[1]:.3g}]"
    return text


def markdown(runs: list[RunMetrics]) -> str:
    lines = ["# Run comparison", "", "## Training", ""]
    lines += [
        "| run | steps | final train loss | last eval step |",
        "|---|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r.name} | {_fmt(r.last_step)} | {_fmt(r.final_loss)} | {_fmt(r.last_eval_step)} |"
        )
    rows = [(r, task, rec) for r in runs for task, rec in r.last_eval().items()]
    lines += ["", "## Evaluation (each run's last evaluation)", ""]
    if not rows:
        lines.append("No evaluation records.")
        return "\n".join(lines) + "\n"
    cols = [(k, t) for k, t in EVAL_COLUMNS if any(rec.get(k) is not None for _, _, rec in rows)]
    header = ["run", "task", *(t for _, t in cols), "count", "unparseable"]

    def table(table_rows) -> list[str]:
        out = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
        for r, task, rec in table_rows:
            ci = rec.get("ci95") or {}
            cells = [r.name, task, *(_fmt(rec.get(k), ci.get(k)) for k, _ in cols)]
            cells += [_fmt(rec.get("count")), _fmt(rec.get("unparseable"))]
            out.append("| " + " | ".join(cells) + " |")
        return out

    lines += table(rows)
    if any(rec.get("ci95") for _, _, rec in rows):
        lines += ["", "Brackets: 95% bootstrap interval over subjects."]
    per_subject = [(r, t, rec["per_subject"]) for r, t, rec in rows if rec.get("per_subject")]
    if per_subject:
        lines += ["", "### Per subject (windows of a subject aggregated)", ""]
        lines += table(per_subject)
    return "\n".join(lines) + "\n"


def plot(runs: list[RunMetrics], out_png: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax_train, ax_eval = fig.subplots(1, 2)
    for r in runs:
        pts = [(s, v) for s, v in sorted(r.train.items()) if v is not None]
        if pts:
            ax_train.plot(*zip(*pts), label=r.name, linewidth=1)
        curve = r.eval_loss_curve()
        if curve:
            ax_eval.plot(*zip(*curve), marker="o", label=r.name, linewidth=1)
    ax_train.set(title="training loss", xlabel="optimizer step", ylabel="loss")
    ax_eval.set(title="evaluation loss (teacher-forced)", xlabel="optimizer step", ylabel="loss")
    for ax in (ax_train, ax_eval):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no records", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    with atomic_path(out_png, ".png") as tmp:
        fig.savefig(tmp, format="png")


def report(run_dirs: list[str | os.PathLike[str]], out: str | os.PathLike[str]) -> dict[str, Path]:
    paths = [Path(p) for p in run_dirs]
    runs = [load_run(p, n) for p, n in zip(paths, _names(paths), strict=True)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    png, md = out / "loss_curves.png", out / "report.md"
    plot(runs, png)
    text = markdown(runs) + f"\n![loss curves]({png.name})\n"
    atomic_write_text(md, text)
    return {"png": png, "markdown": md}


def main(argv: Sequence[str] | None = None) -> int:
    """0 written; 2 a run that cannot be read (one ``error:`` line); 1 a failure."""
    return run_main(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    p = argparse.ArgumentParser(prog="umbrella-report", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (holding metrics.jsonl)")
    p.add_argument("--out", required=True, help="directory for loss_curves.png and report.md")
    add_debug_flag(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="umbrella-report: %(message)s")
    written = report(args.runs, args.out)
    print(written["markdown"].read_text(), end="")
    print(f"wrote {written['markdown']} and {written['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
