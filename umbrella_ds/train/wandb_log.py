"""Weights & Biases for a run: ``log.wandb_project`` set -> rank 0 logs every metrics.jsonl
number (``train/loss``, ``eval/TASK/accuracy``, ...) at its step, and the resolved run config.

The API key comes only from the environment (``WANDB_API_KEY``), never from a file in the
repository or the config. ``WANDB_MODE=offline`` needs no key: the run is written under
``OUT/wandb/`` for a later ``wandb sync``. Whether logging can work is checked before training
starts (``problem``; a ConfigError naming ``log.wandb_project``), because a tracking setting that
silently logs nothing is worse than none. A resumed run (a requeued SLURM job) continues the same
W&B run: its id is kept in ``OUT/wandb-run-id``.

wandb is an optional dependency (``pip install 'umbrella-ds[wandb]'``; the dev extra has it).
"""

from __future__ import annotations

import importlib.util
import os
import secrets
from pathlib import Path
from typing import Any

RUN_ID_FILE = "wandb-run-id"
NO_KEY_MODES = ("offline", "disabled", "dryrun")


def problem(project: str | None) -> str | None:
    """Why ``log.wandb_project`` cannot log, or None (also None when it is not set)."""
    if not project:
        return None
    if importlib.util.find_spec("wandb") is None:
        return "wandb is not installed: pip install 'umbrella-ds[wandb]', or unset it"
    if os.environ.get("WANDB_MODE", "") not in NO_KEY_MODES and not os.environ.get("WANDB_API_KEY"):
        return (
            "set WANDB_API_KEY in the environment (the key is read from nowhere else), or "
            "WANDB_MODE=offline to write the run under OUT/wandb for a later `wandb sync`"
        )
    return None


def start(project: str, out: Path, config: dict[str, Any] | None):
    """A wandb run for this output directory (the same one across restarts)."""
    import wandb

    id_file = out / RUN_ID_FILE
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        run_id = secrets.token_hex(8)
        id_file.write_text(run_id + "\n")
    return wandb.init(
        project=project,
        dir=str(out),
        id=run_id,
        name=out.name,
        resume="allow",
        config=config or {},
    )
