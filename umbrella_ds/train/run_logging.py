"""Rank-0 outputs of a run: ``metrics.jsonl``, TensorBoard, optional W&B, a progress bar, MFU.

(Named ``run_logging`` so it does not shadow the standard ``logging`` module inside the package.)

metrics.jsonl records, one JSON object a line:
- ``{"split": "start", "ranks": [{"rank", "host", "slurm_node"}...], "world_size", ...}``
- ``{"split": "train", "step", "epoch", "loss", "lr", "grad_norm", "samples_per_s",
  "tokens_per_s", "mfu", "data_wait_frac", "skipped"}`` per optimizer step
- ``{"split": "eval", "step", "task", "loss", accuracy ... }`` per evaluated task

MFU (model FLOPs utilisation) counts the useful work of a step (``model.flops``: the formula
and what it leaves out) and divides by the step time and the dense bf16 peak of all GPUs (null
on CPU or an unknown GPU; the peak and its name are in the ``start`` record).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from umbrella_ds.config import LogConfig

log = logging.getLogger(__name__)

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, by a pattern of
# torch.cuda.get_device_name(); the first match wins, so specific variants come first.
PEAK_BF16: list[tuple[str, str, float]] = [
    (r"H100.*PCIe", "H100 PCIe bf16 dense", 756e12),
    (r"H100.*NVL", "H100 NVL bf16 dense", 835e12),
    (r"GH200", "GH200 bf16 dense", 989e12),
    (r"H200", "H200 bf16 dense", 989e12),
    (r"H100", "H100 SXM bf16 dense", 989e12),
    (r"B200", "B200 bf16 dense", 2250e12),
    (r"A100", "A100 bf16 dense", 312e12),
    (r"L40S", "L40S bf16 dense", 362e12),
    (r"\bA10\b", "A10 bf16 dense", 125e12),
]


def gpu_peak(device_name: str) -> tuple[float, str] | None:
    """(peak FLOP/s, its name) for a CUDA device name, or None when unknown."""
    for pattern, label, peak in PEAK_BF16:
        if re.search(pattern, device_name):
            return peak, label
    return None


def device_peak() -> tuple[str, float | None, str | None]:
    """(device name, peak FLOP/s or None, peak name or None) of this process's device."""
    if os.environ.get("DS_ACCELERATOR", "").lower() == "cpu" or not torch.cuda.is_available():
        return "cpu", None, None
    name = torch.cuda.get_device_name()
    found = gpu_peak(name)
    if found is None:
        log.warning("no known bf16 peak for %r: mfu will be null (add it to PEAK_BF16)", name)
        return name, None, None
    return name, found[0], found[1]


def peak_flops() -> float | None:
    return device_peak()[1]


def mfu(flops: float, seconds: float, peak: float | None, devices: int) -> float | None:
    """Achieved FLOP/s over the peak of ``devices`` GPUs; None without a known peak."""
    if not peak or seconds <= 0:
        return None
    return flops / (seconds * peak * devices)


class RunLogger:
    def __init__(
        self,
        cfg: LogConfig,
        out: Path,
        rank: int,
        total_steps: int,
        start_step: int,
        config: dict[str, Any] | None = None,  # the resolved run config, for W&B
    ):
        self.cfg = cfg
        self.main = rank == 0
        self.tb = None
        self.wandb = None
        self.bar = None
        if not self.main:
            return
        out.mkdir(parents=True, exist_ok=True)
        # Kept open for the run (line-buffered: a killed run loses no complete record).
        self.file = open(out / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        if cfg.wandb_project:  # train/preflight.py checked it can log (wandb_log.problem)
            from umbrella_ds.train import wandb_log

            self.wandb = wandb_log.start(cfg.wandb_project, out, config)
        if cfg.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def write(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        self.file.write(json.dumps(record) + "\n")
        split, step = record.get("split"), record.get("step")
        numbers = {
            k: v
            for k, v in record.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k != "step"
        }
        prefix = split if split != "eval" else f"eval/{record.get('task', 'all')}"
        if self.tb is not None and step is not None and split in ("train", "eval"):
            for k, v in numbers.items():
                self.tb.add_scalar(f"{prefix}/{k}", v, step)
        if self.wandb is not None and step is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in numbers.items()}, step=step)

    def progress(self, step: int, loss: float, lr: float) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.file.close()
