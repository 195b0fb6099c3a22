"""``model.patch_embed_init``: start from a patch embedding the predecessor (UMBRELLA/BrainVLM) trained.

Where it reads from:
- an HF Trainer checkpoint folder: ``model.safetensors``, ``pytorch_model.bin``, or either sharded
  with its ``*.index.json`` (only the shards holding patch-embedding tensors are opened, and from
  a safetensors file only those tensors are read: a 7B checkpoint is not loaded to find them);
- a state-dict file (``.safetensors``, or ``.bin``/``.pt``/``.pth`` read with
  ``weights_only=True``), the whole model's or the patch embedding's alone.

Key names. The predecessor spliced its ``PatchEmbed`` in as the vision tower's ``embeddings``, so
its tensors sit under ``vision_tower.vision_model.embeddings.`` (transformers 4.x),
``model.vision_tower.vision_model.embeddings.`` (4.5x) or ``model.vision_tower.embeddings.``
(5.x), possibly behind a ``module.`` wrapper; a bare state dict has them at the top. Its names
``<M>_proj.{weight,bias}`` and ``<M>_positional_embeddings``, with ``<M>`` any spelling of a
modality in the modality table (``T1``/``sMRI``, ``rsfMRI``/``fMRI``: its two folders used both),
map onto ours, ``proj.<name>.{weight,bias}`` and ``pos_embed_<name>`` (accepted too).

Layouts are the same, so the tensors copy as they are: T1 is ``Conv3d(1, E, patch, patch)`` with
the tokens in (gD, gH, gW) order; rsfMRI cuts (D, H, W, T) into blocks flattened in
(pD, pH, pW, pT) order within a block, tokens in (gD, gH, gW, gT) order, as ours does
(tests/model/test_patch_embed_init.py runs its forward beside ours). Shapes are checked against
the configured modalities; a mismatch is one line naming the tensor.

Under ZeRO-3 the parameters are partitions when this runs (the build is under ``zero.Init``):
they are gathered, filled on every rank from the same file, and re-partitioned from rank 0's copy
(``GatheredParameters(modifier_rank=0)``), the one place this module touches DeepSpeed (imported
only when a parameter is a ZeRO-3 partition, as ``llava.py`` detects them).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from umbrella_ds import modality as modality_table
from umbrella_ds.errors import UserError, process_rank

log = logging.getLogger("umbrella_ds.model")

KEY = "model.patch_embed_init"
FOLDER_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
PREPROCESSING_WARNING = (
    "model.patch_embed_init: these weights were trained by UMBRELLA/BrainVLM on other "
    "preprocessing (no reorientation to RAS, area-interpolated resize, whole-volume z-score); "
    "umbrella-pack's inputs differ (docs/FORMAT.md), so the loaded patch embedding sees other "
    "inputs than it was trained on: expect a worse start than its old metrics, and fine-tune"
)
_PREFIX = re.compile(r"^(?:.*\.)?vision_tower\.(?:.*\.)?embeddings\.")
_WRAPPERS = ("module.", "_orig_mod.")


class PatchEmbedInitError(UserError, ValueError):
    """The file cannot initialise the configured patch embedding; the message says why."""


def _spellings() -> dict[str, str]:
    """Every spelling of every modality (case kept as written) -> our name."""
    return {s: m.name for m in modality_table.all() for s in m.spellings()}


def target_name(key: str) -> str | None:
    """Our parameter name (relative to MRIPatchEmbed) for a checkpoint key, or None."""
    for w in _WRAPPERS:
        while key.startswith(w):
            key = key[len(w) :]
    m = _PREFIX.match(key)
    if m:
        key = key[m.end() :]  # else a bare patch-embedding state dict; other modules never match
    spellings = _spellings()
    for spelling, name in spellings.items():
        if key in (f"{spelling}_proj.weight", f"{spelling}_proj.bias"):
            return f"proj.{name}.{key.rsplit('.', 1)[1]}"
        if key == f"{spelling}_positional_embeddings":
            return f"pos_embed_{name}"
    if key.startswith("proj.") and key.count(".") == 2:
        _, name, leaf = key.split(".")
        if name in spellings.values() and leaf in ("weight", "bias"):
            return key
    if key.startswith("pos_embed_") and key[len("pos_embed_") :] in spellings.values():
        return key
    return None


def _is_embedding_key(key: str) -> bool:
    return bool(_PREFIX.match(key))


# ---------------------------------------------------------------- reading


def _files(path: Path) -> list[tuple[Path, list[str] | None]]:
    """(file, keys to read or None for all) for a folder, an index or a single file."""
    if path.is_dir():
        for name in FOLDER_FILES:
            if (path / name).is_file():
                return _files(path / name)
        ds = sorted(p.name for p in path.glob("global_step*"))
        hint = (
            f"; {ds[0]} holds DeepSpeed shards: make a state dict with its zero_to_fp32.py first"
            if ds
            else ""
        )
        raise PatchEmbedInitError(
            f"{KEY}: {path}: no {', '.join(FOLDER_FILES)} in this folder{hint}"
        )
    if not path.is_file():
        raise PatchEmbedInitError(f"{KEY}: {path}: no such file or folder")
    if path.name.endswith(".index.json"):
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PatchEmbedInitError(f"{KEY}: {path}: not a weight index ({exc})") from exc
        by_file: dict[str, list[str]] = {}
        for key, fname in weight_map.items():
            if target_name(key) is not None or _is_embedding_key(key):
                by_file.setdefault(fname, []).append(key)
        return [(path.parent / f, keys) for f, keys in sorted(by_file.items())]
    return [(path, None)]


def _read_file(path: Path, keys: list[str] | None) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise PatchEmbedInitError(f"{KEY}: {path}: no such file (named by the weight index)")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                names = keys if keys is not None else list(f.keys())
                wanted = [k for k in names if target_name(k) is not None or _is_embedding_key(k)]
                return {k: f.get_tensor(k) for k in wanted}
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except PatchEmbedInitError:
        raise
    except Exception as exc:  # a truncated or foreign file: the user's input, said in one line
        raise PatchEmbedInitError(
            f"{KEY}: {path}: cannot read ({type(exc).__name__}: {exc})"
        ) from exc
    for wrapper in ("state_dict", "model", "module"):  # {"state_dict": {...}} and kin
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping):
        raise PatchEmbedInitError(f"{KEY}: {path}: not a state dict ({type(state).__name__})")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def read_patch_embed_state(path: str | Path) -> dict[str, tuple[str, torch.Tensor]]:
    """Our parameter name -> (the key it was read under, tensor), from a file or folder."""
    path = Path(path).expanduser()
    out: dict[str, tuple[str, torch.Tensor]] = {}
    others: list[str] = []
    for f, keys in _files(path):
        for key, tensor in _read_file(f, keys).items():
            target = target_name(key)
            if target is None:
                if _is_embedding_key(key):
                    others.append(key)
                continue
            if target in out:
                raise PatchEmbedInitError(
                    f"{KEY}: {path}: {out[target][0]} and {key} both give {target}"
                )
            out[target] = (key, tensor)
    if not out:
        found = f"; vision-tower embeddings found: {sorted(others)[:4]} (an unpatched model?)"
        raise PatchEmbedInitError(
            f"{KEY}: {path}: no patch-embedding tensors (T1_proj, T1_positional_embeddings, "
            f"rsfMRI_proj, ... or ours){found if others else ''}"
        )
    return out


# ---------------------------------------------------------------- applying


def _shape(p: nn.Parameter) -> tuple[int, ...]:
    """The whole parameter's shape (a ZeRO-3 partition keeps it in ds_shape)."""
    return tuple(getattr(p, "ds_shape", p.shape))


@contextlib.contextmanager
def _whole(params: list[nn.Parameter]) -> Iterator[None]:
    """Whole parameters to write into; under ZeRO-3 gathered, rank 0's values kept on exit."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            yield
    else:
        yield


def load_patch_embed(patch_embed: nn.Module, path: str | Path) -> list[str]:
    """Copy the file's patch embedding into ``patch_embed`` (an MRIPatchEmbed); returns the
    parameter names filled. Every check runs before anything is written."""
    state = read_patch_embed_state(path)
    params = dict(patch_embed.named_parameters())
    specs = patch_embed.specs
    plan: list[tuple[nn.Parameter, torch.Tensor]] = []
    used: set[str] = set()
    for name, spec in specs.items():
        for target in (f"proj.{name}.weight", f"proj.{name}.bias", f"pos_embed_{name}"):
            if target not in state:
                have = sorted(
                    {
                        t.split(".")[1] if t.startswith("proj.") else t[len("pos_embed_") :]
                        for t in state
                    }
                )
                raise PatchEmbedInitError(
                    f"{KEY}: {path}: no tensor for {target} (modality {name}); the file has "
                    f"patch-embedding tensors for {have}"
                )
            key, tensor = state[target]
            want = _shape(params[target])
            if tuple(tensor.shape) != want:
                raise PatchEmbedInitError(
                    f"{KEY}: {path}: tensor {key} has shape {tuple(tensor.shape)}, but "
                    f"model.modalities.{name} (size {list(spec.size)}, patch {list(spec.patch)}, "
                    f"embed dim {patch_embed.embed_dim}) needs {want}"
                )
            plan.append((params[target], tensor))
            used.add(target)
    unused = sorted(k for t, (k, _) in state.items() if t not in used)
    with _whole([p for p, _ in plan]), torch.no_grad():
        for p, tensor in plan:
            p.data.copy_(tensor.to(dtype=p.dtype, device=p.device))
    if process_rank() == 0:
        log.warning(PREPROCESSING_WARNING)
        log.info(
            "%s: %d tensors loaded from %s%s", KEY, len(plan), path,
            f" (not configured, left out: {unused})" if unused else "",
        )  # fmt: skip
    return sorted(used)


def apply_config(model: nn.Module, model_cfg: Any) -> None:
    """The build hook: load ``model_cfg.patch_embed_init`` into the model's patch embedding, if set."""
    path = getattr(model_cfg, "patch_embed_init", None)
    if not path:
        return
    from umbrella_ds.model import find_patch_embed

    load_patch_embed(find_patch_embed(model), path)
