"""`make bench`: run every benchmark, then regenerate the results table in docs/BENCHMARKS.md.

`python -m benchmarks.run_all [--only NAME ...] [--table-only]`. GPU benchmarks run only where a
GPU is present. The table sits between two markers in docs/BENCHMARKS.md, so the prose around it
(what each figure means, which limit it is measured against) is kept by hand.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS_DIR

# Module name -> whether it needs a GPU. Order: cheapest first.
BENCHMARKS: dict[str, bool] = {
    "benchmarks.read_path": False,
    "benchmarks.compression_bench": False,
    "benchmarks.pack_bench": False,
    "benchmarks.data_bench": False,
    "benchmarks.checkpoint_bench": False,
    "benchmarks.comm_bench": False,
    "benchmarks.train_cpu": False,
    "benchmarks.train_gpu": True,
}
DOC = Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _rows(title: str, values: dict) -> str:
    rows = [f"| {title} | value |", "|---|---|"]
    rows += [f"| {key} | {_fmt(value)} |" for key, value in values.items()]
    return "\n".join(rows) + "\n"


def render_table() -> str:
    """One section per result file: machine, the figures, then the ratios, as two-column tables."""
    parts = []
    for path in sorted(RESULTS_DIR.glob("*.json")):
        record = json.loads(path.read_text())
        m = record.get("machine", {})
        where = f"{m.get('cpu')} ({m.get('cores')} cores)"
        if m.get("gpu"):
            where = f"{m['gpu']}, host {where}"
        if m.get("load_avg_1m") is not None:
            where += f", load average {m['load_avg_1m']} when written"
        parts.append(f"### {record['name']}\n\nMachine: {where}\n")
        parts.append(_rows("figure", record.get("figures", {})))
        if record.get("ratio"):
            parts.append(_rows("ratio", record["ratio"]))
    return "\n".join(parts)


def write_table() -> None:
    text = DOC.read_text() if DOC.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{BEGIN}\n{render_table()}{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", help="benchmark names, e.g. read_path pack_bench")
    parser.add_argument("--table-only", action="store_true", help="only regenerate the table")
    args = parser.parse_args(argv)
    failed = []
    if not args.table_only:
        import torch

        has_gpu = torch.cuda.is_available()
        for module, needs_gpu in BENCHMARKS.items():
            short = module.rsplit(".", 1)[1]
            if args.only and short not in args.only:
                continue
            if needs_gpu and not has_gpu:
                print(f"skip {short}: needs a GPU")
                continue
            print(f"== {short}", flush=True)
            start = time.perf_counter()
            try:
                importlib.import_module(module).main([])
                print(f"== {short} done in {time.perf_counter() - start:.0f} s", flush=True)
            except ModuleNotFoundError as exc:
                print(f"skip {short}: {exc}")
            except (
                Exception
            ) as exc:  # report and go on: one broken benchmark must not hide the rest
                print(f"FAILED {short}: {exc!r}", file=sys.stderr)
                failed.append(short)
    write_table()
    print(f"table written to {DOC}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
