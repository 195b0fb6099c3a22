"""``train.deterministic: true``: the same bits from the same inputs on one GPU, at a cost.

Without it a GPU run is reproducible only to rounding: the SDPA flash and memory-efficient
backward kernels accumulate with atomics, cuDNN picks algorithms by benchmark and may use
non-deterministic ones, cuBLAS splits reductions by workspace, and NCCL's reduction order follows
the topology. With it (docs/OPERATIONS.md "Reproducibility on GPUs"):

* ``torch.use_deterministic_algorithms(True)``: every op takes its deterministic implementation,
  and an op that has none raises, naming itself, instead of varying silently;
* ``torch.backends.cudnn.deterministic = True`` and ``benchmark = False``;
* ``CUBLAS_WORKSPACE_CONFIG=:4096:8``, which cuBLAS needs for deterministic GEMMs from CUDA 10.2
  on (torch raises without it once deterministic algorithms are on). It is read when the first
  cuBLAS handle is made, so this runs before the process touches CUDA;
* the math SDPA backend only (flash, memory-efficient and cuDNN attention off).

NCCL is not covered: its all-reduce order is fixed for a fixed topology and world size, not
across them. On the CPU the switches change little (gloo and the CPU kernels are already
deterministic for a fixed thread count).
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("umbrella_ds.train")

CUBLAS_WORKSPACE = ":4096:8"


def enable_deterministic() -> None:
    """Switch every source of run-to-run variation this process controls to its fixed form."""
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    if hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        torch.backends.cuda.enable_cudnn_sdp(False)
    torch.backends.cuda.enable_math_sdp(True)
    log.info("train.deterministic: deterministic algorithms, math SDPA, CUBLAS_WORKSPACE_CONFIG=%s",
             CUBLAS_WORKSPACE)  # fmt: skip
