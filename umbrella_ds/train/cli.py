"""``umbrella-train`` / ``python -m umbrella_ds.train``: arguments -> config -> run -> exit status."""

from __future__ import annotations

import argparse
import sys

from umbrella_ds.train import signals

# Before anything slow is imported: Python dies on SIGUSR1 by default, and SLURM may send it early.
signals.install()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from umbrella_ds.config import ConfigError, load_config

    overrides = [kv for group in args.overrides for kv in group]
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"umbrella-train: config error: {e}", file=sys.stderr)
        return 2
    from umbrella_ds.train.engine import EXIT_FAILED, run

    try:
        return run(
            cfg, resume=args.resume, allow_fingerprint_mismatch=args.allow_fingerprint_mismatch
        )
    except Exception:
        import logging

        logging.getLogger("umbrella_ds.train").exception("training failed")
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
