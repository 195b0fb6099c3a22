"""The frozen base's fingerprint: what a trained patch embedding is only valid against.

A patch embedding is trained against one frozen base. A rebuild that draws other random values,
or loads another copy of "the same" pretrained model, answers differently, silently. So the
engine records the base's hash in every checkpoint's ModelRecipe, and every rebuild of a trained
model (`ModelRecipe.rebuild`, for export, `umbrella-eval`, `umbrella-infer`, `load_trained`)
compares against it.

Schemes (the record's `hash_scheme`; a record without one was written before it existed):
- `bf16-tensors-v1` (HASH_SCHEME): every frozen tensor in name order, its values rounded to bf16,
  hashed on its own (sha256 of the bf16 bytes), then one sha256 over `name:shape:digest` lines. The
  same for ZeRO-0/1/2/3, any world size, fp32 or bf16 builds (fp32 -> bf16 rounds to nearest even
  on CPU and GPU alike). The rounding runs where the tensor lives (the GPU); the host sees bf16
  bytes, half the fp32 ones, in bounded chunks, never an fp32 copy. One rank hashes and broadcasts
  the result; under ZeRO-3 every rank gathers each tensor in turn (a collective) and rank 0 hashes
  it. Why: the fp32 scheme had every rank hash every tensor as fp32 bytes on every start (28 GB
  per rank at 7B, 136 GB at 34B).
- legacy (`LEGACY_SCHEME`, no `hash_scheme` in the record): sha256 over `name:shape;` and the fp32
  bytes of every frozen tensor. Records written before are checked this way.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from umbrella_ds.errors import UserError
from umbrella_ds.model import find_patch_embed

HASH_SCHEME = "bf16-tensors-v1"
LEGACY_SCHEME = "fp32-sha256"  # what a record without `hash_scheme` was hashed with
_CHUNK = 1 << 26  # elements per host copy: 128 MB of bf16


class BaseMismatchError(UserError, RuntimeError):
    """The frozen base is not the one the patch embedding was trained with."""


def _whole(param: torch.nn.Parameter) -> contextlib.AbstractContextManager[Any]:
    if hasattr(param, "ds_id"):  # a ZeRO-3 partition: gather it (a collective on every rank)
        import deepspeed

        return deepspeed.zero.GatheredParameters([param], modifier_rank=None)
    return contextlib.nullcontext()


def _frozen(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """Every parameter but the patch embedding's, in name order (tied ones once)."""
    skip = {id(p) for p in find_patch_embed(model).parameters()}
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if id(p) not in skip:
            yield name, p


def _bf16_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's values rounded to bf16, in row-major order, rounded on its device."""
    h = hashlib.sha256()
    flat = t.detach().reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start : start + _CHUNK].to(torch.bfloat16).view(torch.int16)
        h.update(part.cpu().numpy())  # the buffer itself, no bytes copy
    return h.hexdigest()


def _digests(items: list[tuple[str, torch.nn.Parameter]], rank: int) -> list[str]:
    """Each tensor's digest on rank 0 (the others return nothing but join the gathers).

    Whole tensors are hashed by a few threads at once (sha256 and the bf16 rounding release the
    GIL); ZeRO-3 partitions are gathered one at a time, every rank together."""
    if not any(hasattr(p, "ds_id") for _, p in items):
        if rank != 0:
            return []
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            return list(pool.map(lambda item: _bf16_digest(item[1]), items))
    digests = []
    for _, p in items:
        with _whole(p):
            if rank == 0:
                digests.append(_bf16_digest(p))
    return digests


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def base_hash(model: torch.nn.Module, scheme: str = HASH_SCHEME) -> str:
    """The frozen base's hash in `scheme` (module docstring). With a process group, every rank
    must call it together (ZeRO-3 gathers; the result is broadcast from rank 0)."""
    if scheme == LEGACY_SCHEME:
        return _legacy_sha256(model)
    if scheme != HASH_SCHEME:
        raise BaseMismatchError(
            f"base hash scheme {scheme!r} is unknown to this version (it knows {HASH_SCHEME!r} and "
            "the legacy fp32 one): the record was written by a newer umbrella-ds"
        )
    rank, world = _rank_world()
    items = list(_frozen(model))
    top = hashlib.sha256()
    for (name, p), tensor_digest in zip(items, _digests(items, rank), strict=False):
        shape = tuple(getattr(p, "ds_shape", p.shape))
        top.update(f"{name}:{shape}:{tensor_digest}\n".encode())
    digest = [top.hexdigest() if rank == 0 else None]
    if world > 1:
        torch.distributed.broadcast_object_list(digest, src=0)
    assert digest[0] is not None
    return digest[0]


def _legacy_sha256(model: torch.nn.Module) -> str:
    """The scheme before `hash_scheme`: each frozen tensor's name, shape and fp32 bytes."""
    h = hashlib.sha256()
    for name, p in _frozen(model):
        with _whole(p):
            t = p.detach().to("cpu", torch.float32).contiguous()
            h.update(f"{name}:{tuple(t.shape)};".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()


def recorded_scheme(record: Mapping[str, Any]) -> str:
    """The hash scheme of a base record (records without one are legacy)."""
    return str(record.get("hash_scheme") or LEGACY_SCHEME)


def check_same_base(
    recorded: str | None, rebuilt: str, *, what: str, source: str, hint: str
) -> None:
    """Refuse a rebuilt base whose hash is not the recorded one (None: recorded before hashes
    were). Both hashes must be of one scheme: `check_base` computes the rebuilt one that way."""
    if recorded and recorded != rebuilt:
        raise BaseMismatchError(
            f"base model mismatch: {what} was trained on a frozen base hashing to {recorded}, but "
            f"{source!r} rebuilds one hashing to {rebuilt}; {hint}"
        )


def check_base(
    recorded: Mapping[str, Any] | None,
    model: torch.nn.Module,
    *,
    what: str,
    source: str,
    hint: str,
    known: Mapping[str, str] | None = None,
) -> str:
    """Hash `model` in the recorded scheme and refuse a mismatch; returns that hash. `known`
    maps schemes to hashes already computed for this model (not recomputed). A missing record or
    hash is not checked (written before hashes were)."""
    recorded = recorded or {}
    scheme = recorded_scheme(recorded)
    rebuilt = (known or {}).get(scheme) or base_hash(model, scheme)
    check_same_base(recorded.get("weights_sha256"), rebuilt, what=what, source=source, hint=hint)
    return rebuilt
