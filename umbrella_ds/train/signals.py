"""SIGUSR1/SIGTERM -> a flag the loop checks at the next step boundary.

Installed as early as possible: Python's default action for SIGUSR1 is to die, and SLURM sends it
(``--signal``) to every process of the job, the deepspeed runner included. The flag is only
*local*; the engine agrees on it across ranks (an all-reduce at the step boundary) so that every
rank saves the same step, never one rank alone.
"""

from __future__ import annotations

import signal

_requested: list[str] = []


def _handler(signum, frame) -> None:
    _requested.append(signal.Signals(signum).name)


def install() -> None:
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, _handler)


def requested() -> str | None:
    """The first signal received, or None."""
    return _requested[0] if _requested else None
