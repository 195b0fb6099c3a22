"""Rank-0 outputs of a run: ``metrics.jsonl``, TensorBoard, optional W&B, a progress bar, MFU.

(Named ``run_logging`` so it does not shadow the standard ``logging`` module inside the package.)

metrics.jsonl records, one JSON object a line:
- ``{"split": "start", "ranks": [{"rank", "host", "slurm_node"}...], "world_size", ...}``
- ``{"split": "train", "step", "epoch", "loss", "lr", "grad_norm", "samples_per_s",
  "tokens_per_s", "mfu", "data_wait_frac", "skipped"}`` per optimizer step
- ``{"split": "eval", "step", "task", "loss", accuracy ... }`` per evaluated task

MFU (model FLOPs utilisation) counts the useful work of a step and divides by the step time and
the peak of all GPUs (null on CPU or an unknown GPU). With N_v the vision-tower parameters a token
passes (patch embedding excluded), N_l the language-model parameters a token passes (token
embedding excluded), T_img the image tokens into the vision tower, T the non-pad tokens into the
language model, K the supervised positions, H the hidden size and V the vocabulary:

    forward    2 (N_v T_img + N_l T + H V K)
    backward   2 (N_v T_img + N_l T + H V K)   activation gradients only: frozen weights need no
                                                weight gradients (the patch embedding's are negligible)
    step FLOPs 4 (N_v T_img + N_l T + H V K)

Attention-score FLOPs are left out (short sequences). Recomputation under activation
checkpointing (another forward, 2 (N_v T_img + N_l T)) is *not* useful work: it is reported as
``hfu`` (hardware FLOPs utilisation) beside ``mfu`` when checkpointing is on.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from umbrella_ds.config import LogConfig

log = logging.getLogger(__name__)

# Dense bf16 peaks (FLOP/s) by a substring of torch.cuda.get_device_name().
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops() -> float | None:
    if os.environ.get("DS_ACCELERATOR", "").lower() == "cpu" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


class FlopCounter:
    """Per-step FLOPs from the counts the collate already has (see the module docstring)."""

    def __init__(
        self, n_vision: int, n_language: int, hidden: int, vocab: int, recompute: tuple[bool, bool]
    ):
        self.n_vision, self.n_language = n_vision, n_language
        self.hidden, self.vocab = hidden, vocab
        self.recompute = recompute

    def useful(self, image_tokens: int, tokens: int, loss_tokens: int) -> float:
        return 4.0 * (
            self.n_vision * image_tokens
            + self.n_language * tokens
            + self.hidden * self.vocab * loss_tokens
        )

    def recomputed(self, image_tokens: int, tokens: int) -> float:
        v, lang = self.recompute
        return 2.0 * (self.n_vision * image_tokens * v + self.n_language * tokens * lang)


class RunLogger:
    def __init__(self, cfg: LogConfig, out: Path, rank: int, total_steps: int, start_step: int):
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
        if cfg.wandb_project and os.environ.get("WANDB_API_KEY"):
            try:
                import wandb
            except ImportError:
                log.warning(
                    "log.wandb_project is set but wandb is not installed: not logging to W&B"
                )
            else:
                self.wandb = wandb.init(project=cfg.wandb_project, dir=str(out), resume="allow")
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
