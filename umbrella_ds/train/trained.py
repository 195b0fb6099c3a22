"""The one loader of a trained model: a run directory, its ``checkpoints`` directory (``latest``
is followed), a step directory or an export directory -> (model, tokenizer, ModelRecipe).

Evaluation (``umbrella-eval``), export, inference and ``load_trained`` all load through here, so a
checkpoint and its export are rebuilt by the same code from the same record: the ModelRecipe saved
under ``recipe`` in ``meta.json`` and ``export.json`` (``model/recipe.py``). Records written before
the recipe existed are read by ``recipe_from_old``, the one reader of the old keys.

Why the model is rebuilt without DeepSpeed: the frozen base is drawn from the recipe on one process
and checked against the recorded hash; only the trained patch embedding is read from disk (a
checkpoint's fp32 master weights through ``zero_to_fp32``'s consolidation, any ZeRO stage and world
size; an export's ``patch_embed.safetensors``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from umbrella_ds.errors import UserError
from umbrella_ds.model.recipe import RECIPE_KEY, ModelRecipe

EXPORT_INFO = "export.json"
WEIGHTS = "patch_embed.safetensors"
PREFIX = "model."  # the engine wraps the HF model as LossModule.model


@dataclass(frozen=True)
class Trained:
    """A trained model on disk, located but not loaded: a checkpoint's step folder or an export."""

    kind: str  # "checkpoint" | "export"
    path: Path  # the step dir or the export dir
    record_file: Path  # meta.json or export.json
    record: dict[str, Any]  # its content

    @property
    def config(self):
        """The run config it was trained with (a RunConfig)."""
        from umbrella_ds.config import config_from_dict

        return config_from_dict(self.record["run_config" if self.kind == "export" else "config"])

    @property
    def step(self) -> int:
        return int(self.record["step"])

    @property
    def recipe(self) -> ModelRecipe:
        return recipe_of(self.record)


def locate(path: str | Path) -> Trained:
    """Find what `path` names: an export dir (holds export.json) or a checkpoint (run dir,
    checkpoints dir or step dir, resolved by `checkpoint.resolve`, format checked)."""
    from umbrella_ds.train.checkpoint import META, read_meta, resolve

    p = Path(path).expanduser().resolve()
    if (p / EXPORT_INFO).is_file():
        try:
            info = json.loads((p / EXPORT_INFO).read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{p / EXPORT_INFO}:{exc.lineno}: malformed JSON ({exc.msg})") from exc
        return Trained("export", p, p / EXPORT_INFO, info)
    step_dir = resolve(p)  # CheckpointError (a UserError) names the path
    return Trained("checkpoint", step_dir, step_dir / META, read_meta(step_dir))


def recipe_of(record: Mapping[str, Any]) -> ModelRecipe:
    """The recipe of a meta.json or export.json, in today's layout or an older one."""
    if RECIPE_KEY in record:
        return ModelRecipe.from_dict(record[RECIPE_KEY])
    return recipe_from_old(record)


def recipe_from_old(record: Mapping[str, Any]) -> ModelRecipe:
    """The one reader of the keys written before the recipe:

    - a checkpoint's meta.json, format 1: the run config (``config``) and, since the base
      fingerprint, ``base`` = {weights_sha256, [hash_scheme, init_scheme] | [init_path]};
    - an export.json, format 1 and 2: top-level ``base`` = {preset, path, weights_sha256, ...},
      ``init``, ``seed``, ``modalities`` and, before seeded init, a top-level ``init_path``.

    A base without ``init_scheme`` was drawn before seeded init: its ``init_path`` is the
    record's, else the export's top-level one, else the one the run config implies (ZeRO-3 and a
    random init: "zero3"), else "whole".
    """
    from umbrella_ds.config import config_from_dict

    cfg = None
    if "run_config" in record and "base" in record and "seed" in record:  # an export
        base = dict(record["base"])
        path, preset = base.get("path"), base.get("preset")
        recipe = ModelRecipe.create(
            path or preset, is_path=bool(path), init=record.get("init"), seed=record["seed"],
            modalities=record["modalities"],
        )  # fmt: skip
        fallback = record.get("init_path", "whole")
    else:  # a checkpoint's meta.json
        cfg = config_from_dict(record["config"])
        base = dict(record.get("base") or {})
        recipe = recipe_for_config(cfg)
        fallback = None
    scheme = base.get("init_scheme")
    init_path = None
    if scheme is None:
        init_path = base.get("init_path") or fallback
        if init_path is None and cfg is not None:
            from umbrella_ds.train.ds_setup import load_ds_json, zero_stage
            from umbrella_ds.train.legacy_init import random_init_path

            zero3 = zero_stage(load_ds_json(cfg.train.deepspeed)) == 3
            init_path = random_init_path(zero3, cfg.model.init_kind)
        init_path = init_path or "whole"
    return recipe.with_base(
        weights_sha256=base.get("weights_sha256"),
        hash_scheme=base.get("hash_scheme"),
        init_scheme=scheme,
        init_path=init_path,
    )


def recipe_for_config(cfg) -> ModelRecipe:
    """The recipe a run config describes, before anything is built (no base fingerprint yet)."""
    return ModelRecipe.create(
        cfg.model.source, is_path=bool(cfg.model.path), init=cfg.model.init_kind,
        seed=cfg.train.seed, modalities=cfg.model.modalities,
    )  # fmt: skip


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


def load(
    path: str | Path | Trained,
    base: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    verify_base: bool = True,
):
    """(model, tokenizer, recipe) of a run, step or export directory, in eval mode.

    ``base`` overrides where the frozen base comes from (a preset name or a local directory, e.g.
    another copy of the pretrained weights). With ``verify_base`` the rebuilt base must hash to the
    recorded one (BaseMismatchError names both; records from before hashes are not checked). The
    returned recipe carries the rebuilt base's hash (what an export of it records)."""
    found = path if isinstance(path, Trained) else locate(path)
    recipe = found.recipe
    model, tokenizer, rebuilt = recipe.rebuild(
        None if base is None else str(base), dtype, what=str(found.path), verify=verify_base
    )
    if found.kind == "export":
        _load_export_weights(found.path, model)
        if (found.path / "tokenizer").is_dir():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(
                str(found.path / "tokenizer"), local_files_only=True
            )
    else:
        state = trained_state(found.path)
        trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        if sorted(state) != trainable:
            raise RuntimeError(
                f"{found.path}: trained tensors {sorted(state)} do not match the model's {trainable}"
            )
        model.load_state_dict(state, strict=False)
    model.eval()
    return model, tokenizer, rebuilt


def _load_export_weights(export_dir: Path, model: torch.nn.Module) -> None:
    from safetensors.torch import load_file

    from umbrella_ds.model import find_patch_embed

    find_patch_embed(model).load_state_dict(load_file(str(export_dir / WEIGHTS)), strict=True)
