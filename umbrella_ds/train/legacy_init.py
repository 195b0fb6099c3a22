"""Random bases drawn before seeded init, redrawn read-only on one process.

Before `model/seeded_init.py`, a random base was transformers' own initialisation from
`torch.manual_seed(seed)`, and the values depended on how the run was built: whole ("whole"), or
module by module as DeepSpeed's ZeRO-3 init gathers each one ("zero3"). Checkpoints and exports of
that time record the path (`init_path`), or, older still, imply it by their run config. They are
still evaluated and exported (`ModelRecipe.build` passes `legacy_random_base(path)` to
build_model), never resumed for training (`factory.check_resume_base`).

The ZeRO-3 replay lives here, beside the rest of the ZeRO-3 construction, not in `model/`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Literal

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, PreTrainedModel
from transformers.initialization import no_init_weights

InitPath = Literal["whole", "zero3"]


def random_init_path(zero3: bool, init: str) -> InitPath:
    """The init path a legacy run's frozen base was drawn by (records before it had one)."""
    return "zero3" if zero3 and init == "random" else "whole"


def legacy_random_base(
    init_path: str,
) -> Callable[[LlavaConfig, torch.dtype, int], LlavaForConditionalGeneration]:
    """build_model's `construct_base` for a base drawn by `init_path` before seeded init."""
    if init_path not in ("whole", "zero3"):
        raise ValueError(f"legacy init_path {init_path!r}: whole | zero3")

    def construct(config: LlavaConfig, dtype: torch.dtype, seed: int):
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            with no_init_weights() if init_path == "zero3" else contextlib.nullcontext():
                model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
            if init_path == "zero3":
                _initialize_weights_as_zero3(model)
        return model

    return construct


def _initialize_weights_as_zero3(model: PreTrainedModel) -> None:
    """transformers' `initialize_weights_zero3` on one process: the same module order and the same
    `_initialize_weights` calls, on whole tensors instead of gathered partitions, so the same seed
    draws the same values as rank 0 did in a partitioned build of the legacy code."""
    from transformers.initialization import guard_torch_init_functions

    is_remote_code = model.is_remote_code()

    def apply(module: torch.nn.Module, fn: Callable) -> None:
        for child in module.children():
            if isinstance(child, PreTrainedModel):
                apply(child, child._initialize_weights)
            else:
                apply(child, fn)
        fn(module, is_remote_code)

    with torch.no_grad(), guard_torch_init_functions():
        apply(model, model._initialize_weights)
