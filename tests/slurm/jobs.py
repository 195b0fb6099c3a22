"""Helpers for the SLURM tests: the trainer under test, metrics, job logs, rank processes."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
}


@dataclass(frozen=True)
class Trainer:
    """What the sbatch scripts are given: script, config, overrides and extra environment."""

    script: str
    config: str
    overrides: str
    env: dict[str, str] = field(default_factory=dict)

    def job_env(self, out: Path, *, extra_overrides: str = "", **env: str) -> dict[str, str]:
        return {
            "CONFIG": self.config,
            "OUT": str(out),
            "OVERRIDES": f"{self.overrides} {extra_overrides}".strip(),
            "UMBRELLA_TRAIN_SCRIPT": self.script,
            "DS_ACCELERATOR": "cpu",
            "OMP_NUM_THREADS": "1",
            **self.env,
            **env,
        }


def metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_records(out: Path) -> list[dict]:
    return [r for r in metrics(out) if r.get("split") == "train"]


def start_records(out: Path) -> list[dict]:
    return [r for r in metrics(out) if r.get("split") == "start"]


def wait_for_step(out: Path, step: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        recs = train_records(out)
        if recs and recs[-1]["step"] >= step:
            return
        time.sleep(0.5)
    raise AssertionError(f"no train step {step} in {out}/metrics.jsonl after {timeout}s")


def latest_checkpoint(out: Path) -> Path:
    ckpt = out / "checkpoints"
    return ckpt / (ckpt / "latest").read_text().strip()


def trained_weights(step_dir: Path) -> dict[str, torch.Tensor]:
    """The trained parameters (the patch embedding) saved in one checkpoint folder."""
    state = torch.load(
        step_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
    )
    return dict(state["module"])


def job_log(out: Path, job_id: str) -> str:
    path = out.parent / f"slurm-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def rank_pids(job_id: str, rank: int, script: str) -> list[int]:
    """The trainer process(es) of one rank: SLURM_PROCID=rank in a job step (not the batch step,
    where the deepspeed runner also names the script), whose parent is not itself such a process
    (data-loader workers inherit both)."""
    found: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if (
            f"SLURM_JOB_ID={job_id}".encode() in environ
            and f"SLURM_PROCID={rank}".encode() in environ
            and any(v.startswith(b"SLURM_STEP_ID=") and v[14:].isdigit() for v in environ)
            and os.path.basename(script) in cmdline
            and "python" in cmdline
        ):
            found[int(entry.name)] = ppid
    return [pid for pid, ppid in found.items() if ppid not in found]
