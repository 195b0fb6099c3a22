"""User errors and failures: the one convention every umbrella command-line tool follows.

A user error (a wrong config key or value, a bad instruction file or manifest, a path that is not
a checkpoint, export or shard directory, a malformed ``--scan``, an unknown preset, batch
arithmetic that does not divide, an unreadable DeepSpeed JSON, an unknown keep_best name, ...)
prints **one line** on stderr and exits 2::

    error: <file:line | dotted.config.key | --flag>: <what is wrong and what to do>

An internal failure keeps its traceback and exits 1. Why the split: a SLURM user reads these in
a log file and must tell their own mistake, fixable by editing a YAML or a flag, from a crash
that needs a bug report; a traceback around a config typo hides the one line that matters.

``--debug`` (every CLI accepts it) or ``UMBRELLA_DEBUG=1`` prints the traceback of a user error
too, above the error line.

Under a multi-process launcher (deepspeed, torchrun, srun, mpirun) every rank hits the same user
error, because user errors come from inputs every rank reads; only rank 0 prints the line, so
the log shows it once, and every rank exits 2 (the deepspeed launcher then exits with the first
failing rank's status, 2). ``UMBRELLA_DEBUG=1`` makes every rank print, with its rank.

Library code raises a subclass of :class:`UserError` (``ConfigError``, ``InstructionError``,
``UsageError``, ...); the message starts with where the problem is. Nothing here imports
torch: the CLIs import this module before anything slow.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Sequence

EXIT_FAILED = 1
EXIT_USAGE = 2
DEBUG_ENV = "UMBRELLA_DEBUG"
DEBUG_FLAG = "--debug"
# Where the launchers put the global rank. MPI's own before SLURM's: ranks that mpirun starts
# inside an allocation (launch/pack.sbatch) inherit SLURM_PROCID from their node's daemon.
_RANK_VARS = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID")


class UserError(Exception):
    """Something the user gave is wrong: exit status 2, one line, no traceback.

    The message starts with where the problem is (``file:line``, a dotted config key, a flag)
    and says what to change."""


class UsageError(UserError):
    """A command-line argument that cannot be used (the message names the flag)."""


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    """``--debug`` among the arguments, or ``UMBRELLA_DEBUG`` set to anything but 0/empty."""
    args = sys.argv[1:] if argv is None else argv
    return DEBUG_FLAG in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def add_debug_flag(parser) -> None:  # argparse.ArgumentParser; untyped to keep imports light
    """Declares ``--debug`` so argparse accepts it; :func:`run_main` reads it from argv."""
    parser.add_argument(
        DEBUG_FLAG,
        action="store_true",
        help=f"show the traceback of a user error too (or set {DEBUG_ENV}=1)",
    )


def process_rank() -> int:
    """This process's global rank as its launcher set it, 0 when started alone."""
    for name in _RANK_VARS:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def error_line(exc: BaseException) -> str:
    """``error: <message>`` on one line (a multi-line message is joined with ``; ``)."""
    text = "; ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    return f"error: {text or type(exc).__name__}"


def report(exc: UserError, debug: bool) -> None:
    """Print the error line (rank 0 only, unless debugging); with ``debug`` the traceback first."""
    rank = process_rank()
    if rank != 0 and not debug:
        return
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    line = error_line(exc)
    if rank != 0:
        line = f"[rank {rank}] {line}"
    print(line, file=sys.stderr, flush=True)


def run_main(body: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a CLI's ``body(argv)``: its exit status, or 2 after the error line of a user error.

    Anything else propagates: Python prints the traceback and exits 1."""
    try:
        return body(argv)
    except UserError as exc:
        report(exc, debug_requested(argv))
        return EXIT_USAGE
