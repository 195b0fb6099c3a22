"""``umbrella-train`` / ``python -m umbrella_ds.train``: arguments -> config -> run -> exit status.

With ``--from-umbrella-config OLD.yaml --out RUN.yaml`` it trains nothing: it writes a run config
from the predecessor's (UMBRELLA/BrainVLM) YAML and lists what it could not carry
(umbrella_ds/train/umbrella_config.py), then exits 0.

With ``--find-micro-batch`` it trains nothing: one process reports the largest micro-batch that
fits the config and its throughput (umbrella_ds/train/micro_batch.py), then exits 0.

Exit statuses: 0 finished, 75 stopped on a signal after a complete checkpoint, 1 failed (with a
traceback in the log), 2 a user error: one ``error: <key or file:line>: ...`` line from rank 0,
no traceback (umbrella_ds/errors.py; ``--debug`` or ``UMBRELLA_DEBUG=1`` adds it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from umbrella_ds.errors import UsageError, UserError, add_debug_flag, run_main
from umbrella_ds.train import signals

# Before anything slow is imported: Python dies on SIGUSR1 by default, and SLURM may send it early.
signals.install()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="umbrella-train", description=__doc__)
    p.add_argument(
        "--config", required=False, help="run YAML (relative paths resolve from the cwd)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, repeatable; one --set may take several pairs",
    )
    p.add_argument(
        "--resume",
        default="auto",
        help="auto (default: OUT/checkpoints/latest if present, else fresh), none, or a run/"
        "checkpoints/step directory",
    )
    p.add_argument(
        "--allow-fingerprint-mismatch",
        action="store_true",
        help="resume even though the config, model or data fingerprint changed",
    )
    finder = p.add_argument_group("micro-batch finder (one process, no training)")
    finder.add_argument(
        "--find-micro-batch",
        action="store_true",
        help="report the largest train.micro_batch that fits this config, and its samples/s",
    )
    finder.add_argument(
        "--max-memory-gib",
        type=float,
        default=None,
        help="finder memory cap in GiB (GPU: peak allocated in the step; CPU: RSS growth in the step)",
    )
    finder.add_argument("--max-micro-batch", type=int, default=1024, help="stop doubling here")
    finder.add_argument("--finder-steps", type=int, default=2, help="timed steps per size")
    finder.add_argument(
        "--text-tokens",
        type=int,
        default=64,
        help="text tokens per synthetic sample (besides one image per configured modality)",
    )
    finder.add_argument(
        "--answer-tokens", type=int, default=4, help="supervised tokens per synthetic sample"
    )
    old = p.add_argument_group("from UMBRELLA/BrainVLM (writes a run config, no training)")
    old.add_argument(
        "--from-umbrella-config",
        metavar="OLD.yaml",
        default=None,
        help="the predecessor's run YAML to convert",
    )
    old.add_argument("--out", default=None, metavar="RUN.yaml", help="run config to write")
    old.add_argument(
        "--world-size", type=int, default=1, help="ranks the global batch is computed for"
    )
    old.add_argument(
        "--model-path", default=None, metavar="DIR", help="local copy of model.hf_name"
    )
    old.add_argument(
        "--instructions",
        nargs="+",
        default=None,
        metavar="FILE|DIR",
        help="training instruction files (data.train; max_epochs -> max_steps counts them)",
    )
    old.add_argument(
        "--eval-instructions", nargs="+", default=None, metavar="FILE|DIR", help="data.eval"
    )
    old.add_argument(
        "--deepspeed", default=None, metavar="JSON", help="the DeepSpeed JSON the old run used"
    )
    old.add_argument("--shards", default="shards", metavar="DIR", help="data.shards")
    add_debug_flag(p)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    if args.from_umbrella_config:
        from umbrella_ds.train import umbrella_config

        return umbrella_config.run(args)
    if args.out or args.instructions or args.deepspeed:
        raise UsageError("--out, --instructions, --deepspeed: only with --from-umbrella-config")
    from umbrella_ds.config import load_config
    from umbrella_ds.train import preflight

    overrides = [kv for group in args.overrides for kv in group]
    cfg = load_config(args.config, overrides)
    if args.find_micro_batch:
        return _find_micro_batch(cfg, args)
    preflight.check_run(cfg)
    from umbrella_ds.train.engine import EXIT_FAILED, run

    try:
        return run(
            cfg, resume=args.resume, allow_fingerprint_mismatch=args.allow_fingerprint_mismatch
        )
    except UserError:
        raise  # one line and exit 2 (run_main), not a traceback
    except Exception:
        import logging

        logging.getLogger("umbrella_ds.train").exception("training failed")
        return EXIT_FAILED


def _find_micro_batch(cfg, args: argparse.Namespace) -> int:
    from umbrella_ds.train import micro_batch as mbf

    for name in ("max_micro_batch", "finder_steps", "text_tokens", "answer_tokens"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.answer_tokens >= args.text_tokens:
        raise UsageError(
            f"--answer-tokens: {args.answer_tokens} must be < --text-tokens {args.text_tokens}"
        )
    best, trials = mbf.find_micro_batch(
        cfg,
        max_memory_gib=args.max_memory_gib,
        max_micro_batch=args.max_micro_batch,
        steps=args.finder_steps,
        text_tokens=args.text_tokens,
        answer_tokens=args.answer_tokens,
    )
    print(mbf.format_table(trials, mbf.device_label()))
    if best is None:
        print("umbrella-train: even micro-batch 1 does not fit", file=sys.stderr)
        return 1
    print(
        f"largest micro-batch that fits: {best.micro_batch} "
        f"({best.samples_per_s:.2f} samples/s per process; peak {best.peak_gib:.3f} GiB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
