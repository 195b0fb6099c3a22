"""Launching training runs and reading their outputs.

Multi-rank runs go through the real deepspeed launcher (2 CPU ranks, gloo), each with its own
master port so concurrent test sessions do not collide.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .net import free_port

REPO = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO / "umbrella_ds" / "train" / "__main__.py"
BIN = Path(sys.executable).parent


def base_sets(data: Path, out: Path, **extra: Any) -> list[str]:
    inst = data / "raw" / "instructions"
    sets = {
        "output_dir": str(out),
        "data.shards": str(data / "shards"),
        "data.train": f"[{inst / 't1_sex_train.jsonl'}]",
        "data.eval": f"[{inst / 't1_sex_eval.jsonl'}]",
        "log.progress": "false",
        "log.every_steps": "1",
        "log.tensorboard": "false",
        "eval.at_end": "false",
        "train.warmup_steps": "3",
        "checkpoint.keep_last": "5",
        # CPU training asked for, not inherited: under the deepspeed launcher (or a GPU node)
        # CUDA_VISIBLE_DEVICES reads as allocated GPUs (umbrella_ds/train/env.py choose_device).
        "train.device": "cpu",
    }
    sets.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in sets.items()]


def train_cmd(nproc: int, sets: list[str], resume: str = "auto", extra: list[str] | None = None):
    return [
        str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()),
        str(TRAIN_SCRIPT), "--config", str(REPO / "configs" / "demo.yaml"),
        "--resume", resume, "--set", *sets, *(extra or []),
    ]  # fmt: skip


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    e.update(extra)
    return e


def run_train(nproc: int, sets: list[str], *, timeout: int = 240, resume: str = "auto", extra=None,
              environ: dict[str, str] | None = None) -> subprocess.CompletedProcess:  # fmt: skip
    return subprocess.run(
        train_cmd(nproc, sets, resume, extra),
        env=environ or env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def start_train(
    nproc: int, sets: list[str], log_path: Path, resume: str = "auto"
) -> subprocess.Popen:
    """Started in its own session so the whole process tree can be signalled/killed."""
    log = open(log_path, "w")  # noqa: SIM115  (handed to the child, closed with the test)
    return subprocess.Popen(
        train_cmd(nproc, sets, resume),
        env=env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        start_new_session=True,
    )


def wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before {what}")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"timed out waiting for {what}")


def kill_tree(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def metrics(out: Path, split: str = "train") -> list[dict[str, Any]]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["split"] == split]


def losses_by_step(out: Path) -> dict[int, float]:
    """Last logged loss per step (a resumed run appends after the records of the killed one)."""
    return {r["step"]: r["loss"] for r in metrics(out)}


def check(proc: subprocess.CompletedProcess, expect: int = 0) -> None:
    assert proc.returncode == expect, (
        f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
