"""Shared helpers and fixtures for the training tests (no tests here).

Multi-rank runs go through the real deepspeed launcher (2 CPU ranks, gloo), each with its own
master port so concurrent test sessions do not collide.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "umbrella_ds" / "train" / "__main__.py"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def train_data(tmp_path_factory) -> Path:
    """A small synthetic cohort, T1 packed at 32^3 (48 subjects: 38 train, 10 eval)."""
    root = tmp_path_factory.getbasetemp() / "train-data"
    if (root / "shards" / "index.json").is_file():
        return root
    raw = root / "raw"
    subprocess.run(
        [BIN / "umbrella-pack", "synth", "--out", raw, "--subjects", "48", "--seed", "0",
         "--t1-shape", "48", "48", "48", "--frames", "8", "--rsfmri-shape", "16", "16", "16"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    subprocess.run(
        [BIN / "umbrella-pack", "build", "--manifest", raw / "manifest.csv", "--out",
         root / "shards", "--workers", "1", "--modalities", "T1", "--t1-size", "32", "32", "32",
         "--no-progress"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return root


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


@pytest.fixture(scope="session")
def fp32_run(train_data, tmp_path_factory) -> Path:
    """A finished 2-rank ZeRO-2 fp32 run with a checkpoint every step and eval at the end."""
    out = tmp_path_factory.getbasetemp() / "fp32-run"
    if (out / "checkpoints" / "latest").is_file() and (out / "predictions.jsonl").is_file():
        return out
    sets = base_sets(
        train_data,
        out,
        **{"train.max_steps": 4, "train.bf16": "false", "checkpoint.every_steps": 1,
           "checkpoint.keep_last": 2, "eval.at_end": "true", "eval.max_new_tokens": 4},
    )  # fmt: skip
    check(run_train(2, sets, timeout=300))
    return out
