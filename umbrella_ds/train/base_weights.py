"""The frozen base's fingerprint: what a trained patch embedding is only valid against.

A patch embedding is trained against one frozen base. A rebuild that draws other random values,
or loads another copy of "the same" pretrained model, answers differently, silently. So the
engine records the sha256 of the base as training saw it in every checkpoint, and export,
`umbrella-eval`, `load_checkpoint_model` and `load_trained` compare their rebuild against it.

Each frozen tensor is hashed with its name and shape as contiguous float32 bytes, so the value does
not depend on the dtype the model was built in (bf16 -> fp32 is exact). Under ZeRO-3 every rank
gathers each tensor in turn (all ranks must call this together); the hash is the same on all.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any

import torch

from umbrella_ds.errors import UserError
from umbrella_ds.model import find_patch_embed


class BaseMismatchError(UserError, RuntimeError):
    """The frozen base is not the one the patch embedding was trained with."""


def _whole(param: torch.nn.Parameter) -> contextlib.AbstractContextManager[Any]:
    if hasattr(param, "ds_id"):  # a ZeRO-3 partition: gather it (a collective on every rank)
        import deepspeed

        return deepspeed.zero.GatheredParameters([param], modifier_rank=None)
    return contextlib.nullcontext()


def base_weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over every parameter but the patch embedding's, by name (see the module docstring)."""
    skip = {id(p) for p in find_patch_embed(model).parameters()}
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if id(p) in skip:
            continue
        with _whole(p):
            t = p.detach().to("cpu", torch.float32).contiguous()
            h.update(f"{name}:{tuple(t.shape)};".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()


def check_same_base(
    recorded: str | None, rebuilt: str, *, what: str, source: str, hint: str
) -> None:
    """Refuse a rebuilt base whose hash is not the recorded one (None: recorded before hashes were)."""
    if recorded and recorded != rebuilt:
        raise BaseMismatchError(
            f"base model mismatch: {what} was trained on a frozen base hashing to {recorded}, but "
            f"{source!r} rebuilds one hashing to {rebuilt}; {hint}"
        )
