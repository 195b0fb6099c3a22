"""``umbrella-export CKPT_DIR --out DIR`` and ``load_trained(DIR, base=None)``.

An export is what a user needs to apply the trained patch embedding without DeepSpeed:

    DIR/patch_embed.safetensors   the trained MRIPatchEmbed state (fp32), keys relative to it
    DIR/export.json               base model (preset or path, init seed, sha256 of its frozen
                                  weights), modalities, tokens per image, the preprocessing the
                                  training shards were packed with, the source checkpoint and the
                                  run config
    DIR/tokenizer/                the tokenizer the model was trained with
    DIR/provenance.json           what made the export (umbrella_ds.provenance)

The frozen base is rebuilt from its preset (random init with the run's seed, which is how training
built it) or from a local pretrained directory (``base=`` may point at another copy of it).
CKPT_DIR may be a run directory, its ``checkpoints`` directory (``latest`` is followed) or a step
directory. The weights are read from DeepSpeed's checkpoint files with ``zero_to_fp32``'s
consolidation (fp32 master weights, any ZeRO stage, any world size) on the CPU.

Why the weights hash and the preprocessing: the patch embedding was trained against one frozen
base and one preprocessing of the scans. ``load_trained`` refuses a base whose frozen weights hash
differently (another checkpoint of the "same" model, a changed preset), and ``umbrella-infer``
preprocesses new scans with the recorded parameters, so an export answers as evaluation did.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from umbrella_ds.io import atomic_write_text
from umbrella_ds.train.base_weights import BaseMismatchError
from umbrella_ds.train.factory import modality_specs, rebuild_for_checkpoint, rebuild_for_export

log = logging.getLogger(__name__)
__all__ = ["BaseMismatchError", "export", "load_checkpoint_model", "load_trained", "trained_state"]

PREFIX = "model."  # the engine wraps the HF model as LossModule.model
EXPORT_INFO = "export.json"
WEIGHTS = "patch_embed.safetensors"
FORMAT = 2  # 2: + base weights sha256, preprocessing, shards fingerprint, provenance.json


def training_preprocessing(shards_dir: str | Path) -> tuple[dict[str, Any], str]:
    """(preprocessing parameters, index fingerprint) of the shards a run trained on."""
    from umbrella_ds.shards import ShardError, open_dataset

    try:
        ds = open_dataset(shards_dir)
    except ShardError as e:
        raise RuntimeError(
            f"cannot read the training shards to record their preprocessing ({e}); pass "
            "--shards DIR with a copy of them"
        ) from e
    return ds.preprocessing, ds.fingerprint


def trained_state(step_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 trainable parameters of a step folder, names as in the HF model."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(
        str(step_dir.parent), tag=step_dir.name, exclude_frozen_parameters=True
    )
    return {
        k[len(PREFIX) :] if k.startswith(PREFIX) else k: v.detach().float()
        for k, v in state.items()
    }


def export(ckpt: str | Path, out: str | Path, shards: str | Path | None = None) -> Path:
    """Write the export of a checkpoint; ``shards`` overrides where the training shards are."""
    from safetensors.torch import save_file

    from umbrella_ds.config import config_from_dict
    from umbrella_ds.model import find_patch_embed, num_image_tokens
    from umbrella_ds.provenance import write_provenance
    from umbrella_ds.train.checkpoint import META, read_meta, resolve

    step_dir = resolve(ckpt)
    meta = read_meta(step_dir)
    cfg = config_from_dict(meta["config"])
    preprocessing, shards_fp = training_preprocessing(shards or cfg.data.shards)
    state = trained_state(step_dir)
    model, tokenizer, base_info = rebuild_for_checkpoint(step_dir, meta)
    patch = find_patch_embed(model)
    prefix = _module_prefix(model, patch)
    patch_state = {
        k[len(prefix) :]: v.contiguous() for k, v in state.items() if k.startswith(prefix)
    }
    if set(patch_state) != set(patch.state_dict()) or len(patch_state) != len(state):
        raise RuntimeError(
            f"{step_dir}: trained tensors {sorted(state)} do not match the patch embedding "
            f"{sorted(prefix + k for k in patch.state_dict())}"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(patch_state, str(out / WEIGHTS))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out / "tokenizer"))
    weights_sha = base_info["weights_sha256"]
    write_provenance(
        out,
        kind="export",
        config=meta["config"],
        inputs={
            "checkpoint_meta": hashlib.sha256((step_dir / META).read_bytes()).hexdigest(),
            "base_weights": weights_sha,
            "shards_index": shards_fp,
        },
        extra={"checkpoint": str(step_dir), "step": meta["step"]},
    )
    info = {
        "format": FORMAT,
        "base": {  # the base record (factory.base_record), legacy ones with their init_path
            "preset": cfg.model.preset if not cfg.model.path else None,
            "path": cfg.model.path,
            **base_info,
        },
        "init": cfg.model.init,
        "seed": cfg.train.seed,
        "modalities": modality_specs(cfg.model),
        "tokens_per_image": {m: num_image_tokens(model, m) for m in cfg.model.modalities},
        "preprocessing": preprocessing,
        "shards_fingerprint": shards_fp,
        "checkpoint": str(step_dir),
        "step": meta["step"],
        "fingerprints": meta["fingerprints"],
        "run_config": meta["config"],
    }
    # written last: a directory without it is not an export
    atomic_write_text(out / EXPORT_INFO, json.dumps(info, indent=1))
    return out


def load_trained(
    path: str | Path,
    base: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    verify_base: bool = True,
):
    """Rebuild the patched model of an export: (model, tokenizer), in eval mode.

    ``base`` overrides where the frozen base comes from (a preset name or a local directory),
    e.g. when the pretrained weights live elsewhere on this machine. With ``verify_base`` the
    frozen weights must hash to what the export recorded (BaseMismatchError otherwise; exports
    made before the hash was recorded are not checked).
    """
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from umbrella_ds.model import find_patch_embed

    path = Path(path)
    info: dict[str, Any] = json.loads((path / EXPORT_INFO).read_text())
    model, tokenizer = rebuild_for_export(info, base, dtype, what=str(path), verify=verify_base)
    patch = find_patch_embed(model)
    state = load_file(str(path / WEIGHTS))
    patch.load_state_dict(state, strict=True)
    if (path / "tokenizer").is_dir():
        tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"), local_files_only=True)
    model.eval()
    return model, tokenizer


def load_checkpoint_model(ckpt: str | Path, base: str | Path | None = None, dtype=torch.float32):
    """The patched model at a checkpoint (run dir, checkpoints dir or step dir), without
    DeepSpeed: the base rebuilt from the run config (or ``base``) and checked against the base the
    run trained on, the trained fp32 weights loaded."""
    from umbrella_ds.train.checkpoint import read_meta, resolve

    step_dir = resolve(ckpt)
    model, tokenizer, _ = rebuild_for_checkpoint(step_dir, read_meta(step_dir), base, dtype)
    state = trained_state(step_dir)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    if sorted(state) != trainable:
        raise RuntimeError(
            f"{step_dir}: trained tensors {sorted(state)} do not match the model's {trainable}"
        )
    model.load_state_dict(state, strict=False)
    model.eval()
    return model, tokenizer


def _module_prefix(model: torch.nn.Module, module: torch.nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name + "."
    raise RuntimeError("patch embedding not found in the model")


def main(argv: Sequence[str] | None = None) -> int:
    """``umbrella-export``: 0 written, 2 a user error (one ``error:`` line), 1 a failure."""
    from umbrella_ds.errors import run_main

    return run_main(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    from umbrella_ds.config import config_from_dict
    from umbrella_ds.errors import add_debug_flag
    from umbrella_ds.train import env
    from umbrella_ds.train.checkpoint import read_meta, resolve
    from umbrella_ds.train.preflight import check_shards

    p = argparse.ArgumentParser(prog="umbrella-export", description=__doc__.split("\n")[0])
    p.add_argument("ckpt", metavar="CKPT_DIR", help="run dir, its checkpoints dir, or a step dir")
    p.add_argument("--out", required=True, help="export directory")
    p.add_argument(
        "--shards",
        default=None,
        help="the training shards (their preprocessing is recorded), if moved from the run config's path",
    )
    env.add_device_flag(p, unset="the exported run's train.device")
    add_debug_flag(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    # The user's paths first, each a one-line error naming it: the checkpoint, then the shards
    # whose preprocessing the export records.
    cfg = config_from_dict(read_meta(resolve(args.ckpt))["config"])
    if args.device is not None:
        env.apply_device_rule(args.device, "--device")
    else:
        env.apply_device_rule(cfg.train.device, "train.device (of the exported run)", recorded=True)
    if args.shards is not None:
        check_shards(args.shards, "--shards")
    else:
        check_shards(cfg.data.shards, "data.shards of the run (moved? pass --shards DIR)")
    out = export(args.ckpt, args.out, shards=args.shards)
    print(f"exported {args.ckpt} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
