"""``umbrella-export CKPT_DIR --out DIR`` and ``load_trained(DIR, base=None)``.

An export is what a user needs to apply the trained patch embedding without DeepSpeed:

    DIR/patch_embed.safetensors   the trained MRIPatchEmbed state (fp32), keys relative to it
    DIR/export.json               the ModelRecipe under "recipe" (model/recipe.py: base preset or
                                  path, init, seed, modalities, template, sha256 of the frozen
                                  weights), the same dict as the checkpoint's meta.json; tokens
                                  per image, the preprocessing the training shards were packed
                                  with, the source checkpoint and the run config
    DIR/tokenizer/                the tokenizer the model was trained with
    DIR/provenance.json           what made the export (umbrella_ds.provenance)

The model is loaded by ``train/trained.py`` (the loader evaluation and inference use too): the
frozen base rebuilt from the checkpoint's recipe (``base=`` may point at another copy of it) and
checked against its hash, the trained weights read from DeepSpeed's checkpoint files with
``zero_to_fp32``'s consolidation (fp32 master weights, any ZeRO stage, any world size) on the CPU.
CKPT_DIR may be a run directory, its ``checkpoints`` directory (``latest`` is followed) or a step
directory.

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

from umbrella_ds.errors import UserError
from umbrella_ds.io import atomic_write_text
from umbrella_ds.model.recipe import RECIPE_KEY
from umbrella_ds.train import trained
from umbrella_ds.train.base_weights import BaseMismatchError
from umbrella_ds.train.trained import EXPORT_INFO, WEIGHTS

log = logging.getLogger(__name__)
__all__ = ["EXPORT_INFO", "BaseMismatchError", "export", "load_trained"]

# 2: + base weights sha256, preprocessing, shards fingerprint, provenance.json. 3: the model
# record is the ModelRecipe under "recipe" (top-level base, init, init_path, seed and modalities
# gone; trained.recipe_from_old reads them in formats 1-2).
FORMAT = 3


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


def export(ckpt: str | Path, out: str | Path, shards: str | Path | None = None) -> Path:
    """Write the export of a checkpoint; ``shards`` overrides where the training shards are."""
    from safetensors.torch import save_file

    from umbrella_ds.model import find_patch_embed, num_image_tokens
    from umbrella_ds.provenance import write_provenance

    found = trained.locate(ckpt)
    if found.kind != "checkpoint":
        raise UserError(f"{ckpt}: an export already (exports are made of checkpoints)")
    step_dir, meta, cfg = found.path, found.record, found.config
    preprocessing, shards_fp = training_preprocessing(shards or cfg.data.shards)
    # the loader checks that the trained tensors are exactly the trainable (patch embedding) ones
    model, tokenizer, recipe = trained.load(found)
    patch_state = {
        k: v.detach().float().contiguous() for k, v in find_patch_embed(model).state_dict().items()
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(patch_state, str(out / WEIGHTS))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out / "tokenizer"))
    write_provenance(
        out,
        kind="export",
        config=meta["config"],
        inputs={
            "checkpoint_meta": hashlib.sha256(found.record_file.read_bytes()).hexdigest(),
            "base_weights": str(recipe.weights_sha256),
            "shards_index": shards_fp,
        },
        extra={"checkpoint": str(step_dir), "step": meta["step"]},
    )
    info = {
        "format": FORMAT,
        RECIPE_KEY: recipe.to_dict(),  # the checkpoint's record (legacy ones filled in)
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
    """Rebuild the patched model of an export (or a checkpoint): (model, tokenizer), in eval mode.

    ``base`` overrides where the frozen base comes from (a preset name or a local directory),
    e.g. when the pretrained weights live elsewhere on this machine. With ``verify_base`` the
    frozen weights must hash to what the export recorded (BaseMismatchError otherwise; exports
    made before the hash was recorded are not checked). `trained.load` also returns the recipe.
    """
    model, tokenizer, _ = trained.load(path, base, dtype, verify_base=verify_base)
    return model, tokenizer


def main(argv: Sequence[str] | None = None) -> int:
    """``umbrella-export``: 0 written, 2 a user error (one ``error:`` line), 1 a failure."""
    from umbrella_ds.errors import run_main

    return run_main(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    from umbrella_ds.errors import add_debug_flag
    from umbrella_ds.train import env
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
    cfg = trained.locate(args.ckpt).config
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
