"""The predecessor's run YAML (UMBRELLA/BrainVLM) -> our run YAML, and a list of what did not carry.

    umbrella-train --from-umbrella-config OLD.yaml --out run.yaml [--world-size N]
                   [--model-path DIR] [--instructions TRAIN ...] [--eval-instructions EVAL ...]
                   [--deepspeed JSON] [--shards DIR]

What maps (both of its folders' forms: ``T1``/``rsfMRI`` and ``sMRI``/``fMRI`` blocks, names
resolved by the modality table):

- ``dataset.<modality>.img_size`` (+ ``sequence_length`` for a series) and
  ``model.<modality>.patch_size`` -> ``model.modalities``. Which modalities: those the
  ``--instructions`` files name; without files, the blocks with an ``img_dir`` (a block without
  one was not trained on and is listed as left out).
- ``model.hf_name`` -> nothing silently. It names a hub model that cannot be downloaded here, and
  our presets of that name are random-init: mapping to one would train on random weights. With
  ``--model-path DIR`` (a local copy) -> ``model.path``; without, ``model.path`` is written unset
  and ``umbrella-train`` refuses the file in one line until it is set.
- ``trainer.learning_rate/warmup_steps/weight_decay`` -> ``train.lr/warmup_steps/weight_decay``;
  ``per_device_batch_size`` -> ``train.micro_batch``; global batch = micro x
  ``gradient_accumulation_steps`` x ``--world-size`` -> ``train.global_batch`` (our accumulation
  is derived from it, so it survives another world size); ``gradient_checkpointing`` -> activation
  checkpointing of both towers; ``logging_steps`` -> ``log.every_steps``; ``mixed_precision`` ->
  ``train.bf16``; ``seed`` -> ``train.seed``.
- ``max_epochs`` -> ``train.max_steps`` = epochs x (training samples // global batch), the
  samples counted in the ``--instructions`` files (as our sampler drops the last partial batch).
- The DeepSpeed JSON they passed to HF Trainer (``--deepspeed``, or ``trainer.deepspeed``) ->
  ``train.deepspeed``.
- Preprocessing keys (``img_size``, ``input_scaling_method``) are not run-config keys here: they
  become the ``umbrella-pack`` commands printed beside the run config.
- ``wandb.API_KEY`` is never copied: a warning names it (rotate it; use ``WANDB_API_KEY``).

Everything else is listed under "not carried" with the reason, in the output and as comments at
the top of the written YAML.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from umbrella_ds import modality as modality_table
from umbrella_ds.config import ConfigError, RunConfig, config_from_dict
from umbrella_ds.errors import UsageError

# Keys read and mapped (per section); any other key is reported as not carried.
_TRAINER_MAPPED = {
    "learning_rate", "warmup_steps", "weight_decay", "per_device_batch_size",
    "gradient_accumulation_steps", "gradient_checkpointing", "max_epochs", "logging_steps",
    "mixed_precision", "deepspeed",
}  # fmt: skip
_WHY_NOT = {
    "dataset.train_size": "splits come from the instruction files (data.train / data.eval)",
    "dataset.val_size": "splits come from the instruction files (data.train / data.eval)",
    "dataset.test_size": "splits come from the instruction files (umbrella-eval --instructions)",
    "dataset.add_context": "prompts come from the instruction files",
    "target": "labels come from the instruction files' answers and metadata.subject_label",
    "study_sample": "the cohort is what the manifest lists (umbrella-pack manifest)",
    "meta_dir": "phenotypes: umbrella-pack manifest --phenotypes",
    "img_dir": "images: umbrella-pack manifest --instructions (+ --path-map)",
    "dataset_split_num": "splits come from the instruction files",
    "stride_between_seq": "windows: data.windows (random start by default; non_overlapping "
    "makes one item per window, as the predecessor did)",
    "stride_within_seq": "frames are consecutive in a window",
    "shuffle_time_sequence": "frames keep their order",
    "label_scaling_method": "regression answers are read as written",
    "dtype": "shards store float16 (docs/FORMAT.md)",
    "trainer.ckpt_dir": "checkpoints go to output_dir/checkpoints",
    "trainer.resume_training": "resume is automatic (--resume auto)",
}
_PREFIXES = ("limit_", "balanced_")


@dataclass
class Conversion:
    """The run config (as a YAML-ready dict) and what the user must know about it."""

    run: dict[str, Any]
    not_carried: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)  # pack commands to run first
    model_path_unset: bool = False


def read_old(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        old = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"--from-umbrella-config {path}: cannot read YAML: {exc}") from exc
    if not isinstance(old, dict):
        raise UsageError(f"--from-umbrella-config {path}: top level must be a mapping")
    return old


def _section(old: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = old.get(key) or {}
    if not isinstance(value, dict):
        raise UsageError(f"{key}: expected a mapping, got {value!r}")
    return value


def _blocks(section: Mapping[str, Any], where: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """Modality blocks of a section: our name -> (their spelling, block)."""
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for key, value in section.items():
        if not isinstance(value, dict):
            continue
        try:
            name = modality_table.get(key).name
        except modality_table.UnknownModalityError:
            continue
        if name in out:
            raise UsageError(f"{where}: both {out[name][0]} and {key} describe {name}")
        out[name] = (key, value)
    return out


def count_samples(files: Sequence[str | Path]) -> tuple[int, set[str]]:
    """(tasks, modalities named) over instruction files/folders, read by training's parser."""
    from umbrella_ds.data.instructions import load_instructions

    n, mods = 0, set()
    for f in files:
        if not Path(f).exists():
            raise UsageError(f"--instructions {f}: no such file or folder")
        for task in load_instructions(f):
            n += 1
            mods.update(im.modality for im in task.images)
    return n, mods


def _ints(value: Any, key: str) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise UsageError(f"{key}: expected a list of integers, got {value!r}")
    return list(value)


def convert(
    old: Mapping[str, Any],
    *,
    world_size: int = 1,
    model_path: str | None = None,
    instructions: Sequence[str | Path] = (),
    eval_instructions: Sequence[str | Path] = (),
    deepspeed: str | None = None,
    shards: str = "shards",
    output_dir: str = "runs/from-umbrella",
) -> Conversion:
    """Map the old YAML onto a run config dict (see the module docstring)."""
    if world_size < 1:
        raise UsageError(f"--world-size: must be >= 1, got {world_size}")
    conv = Conversion(run={})
    dataset, model, trainer = (_section(old, k) for k in ("dataset", "model", "trainer"))
    data_blocks = _blocks(dataset, "dataset")
    patch_blocks = _blocks(model, "model")

    # -- which modalities ------------------------------------------------------------------
    n_train, named = count_samples(instructions) if instructions else (0, set())
    if eval_instructions:
        named |= count_samples(eval_instructions)[1]
    if named:
        chosen = modality_table.ordered(named)
        lacking = [m for m in chosen if m not in data_blocks]
        if lacking:
            raise UsageError(
                f"--instructions name {lacking} but the old YAML has no dataset block for them "
                f"(has {sorted(data_blocks)})"
            )
    else:
        chosen = [m for m, (_, b) in data_blocks.items() if b.get("img_dir")] or list(data_blocks)
    if not chosen:
        raise UsageError("dataset: no modality block (T1/sMRI, rsfMRI/fMRI) to convert")
    for name, (spelling, _) in data_blocks.items():
        if name not in chosen:
            why = (
                "not named by the --instructions files" if named else "no img_dir (not trained on)"
            )
            conv.not_carried.append(f"dataset.{spelling}: {why}; left out of model.modalities")

    modalities: dict[str, dict[str, list[int]]] = {}
    pack_flags: list[str] = []
    for name in chosen:
        m = modality_table.get(name)
        spelling, block = data_blocks[name]
        key = f"dataset.{spelling}"
        if "img_size" not in block:
            raise UsageError(f"{key}.img_size: missing")
        size = _ints(block["img_size"], f"{key}.img_size")
        if len(size) == 1:
            size = size * 3
        if m.is_series:
            if "sequence_length" in block:
                length = int(block["sequence_length"])
                if len(size) == 4 and size[3] != length:
                    conv.not_carried.append(
                        f"{key}.img_size[3]={size[3]}: differs from sequence_length={length}; "
                        "the window is sequence_length frames"
                    )
                size = [*size[:3], length]
            if len(size) != 4:
                raise UsageError(f"{key}: img_size {size} needs a 4th number or sequence_length")
        if name not in patch_blocks or "patch_size" not in patch_blocks[name][1]:
            raise UsageError(f"model.{spelling}.patch_size: missing")
        patch = _ints(patch_blocks[name][1]["patch_size"], f"model.{spelling}.patch_size")
        if len(patch) == 1:
            patch = patch * len(size)
        modalities[name] = {"size": size, "patch": patch}
        pack_flags += [m.size_flag, *map(str, size[:3])]
        if "input_scaling_method" in block:
            norm = str(block["input_scaling_method"])
            if norm not in m.norms:
                raise UsageError(f"{key}.input_scaling_method: {norm!r} is not one of {m.norms}")
            pack_flags += [m.norm_flag, norm]
        for k in block:
            if k in ("img_size", "sequence_length", "input_scaling_method"):
                continue
            why = _WHY_NOT.get(k) or (
                "a sampling limit of the old loader" if k.startswith(_PREFIXES) else "unknown key"
            )
            conv.not_carried.append(f"{key}.{k}: {why}")
    conv.not_carried.append(
        "preprocessing: the predecessor resized by area interpolation without reorientation and "
        "z-scored the whole volume; umbrella-pack reorients to RAS and normalises as "
        "docs/FORMAT.md says, so inputs differ from the old run's"
    )
    for k in dataset:
        if k not in {s for s, _ in data_blocks.values()}:
            conv.not_carried.append(f"dataset.{k}: {_WHY_NOT.get(f'dataset.{k}', 'unknown key')}")

    # -- the base model ------------------------------------------------------------------
    hf_name = model.get("hf_name")
    for k in model:
        if k != "hf_name" and k not in {s for s, _ in patch_blocks.values()}:
            conv.not_carried.append(f"model.{k}: unknown key")
    model_out: dict[str, Any] = {"preset": None, "path": None}
    if model_path:
        model_out.update(path=str(Path(model_path).expanduser().resolve()), init="pretrained")
    else:
        conv.model_path_unset = True
        conv.warnings.append(
            f"model.hf_name {hf_name!r}: cannot be downloaded here, and the preset of that name is "
            "random-init; model.path is left unset and umbrella-train refuses the run config until "
            "it names a local copy (or pass --model-path DIR)"
        )
    model_out["modalities"] = modalities

    # -- the trainer -------------------------------------------------------------------------
    micro = int(trainer.get("per_device_batch_size", 1))
    accum = int(trainer.get("gradient_accumulation_steps", 1))
    global_batch = micro * accum * world_size
    train: dict[str, Any] = {
        "seed": int(old.get("seed", 0)),
        "global_batch": global_batch,
        "micro_batch": micro,
    }
    if "learning_rate" in trainer:
        train["lr"] = float(trainer["learning_rate"])
    if "warmup_steps" in trainer:
        train["warmup_steps"] = int(trainer["warmup_steps"])
    if "weight_decay" in trainer:
        train["weight_decay"] = float(trainer["weight_decay"])
    train["min_lr"] = 0.0
    conv.not_carried.append(
        "schedule: HF Trainer's default decays linearly to 0 after warmup; this run decays by "
        "cosine to train.min_lr=0"
    )
    precision = trainer.get("mixed_precision")
    if precision in (None, "bf16"):
        train["bf16"] = True
        if precision is None:
            conv.not_carried.append(
                "trainer.mixed_precision: absent (the predecessor then trained in fp32); this run "
                "trains in bf16 (train.bf16=false for fp32)"
            )
    elif precision in ("no", "fp32", "float32"):
        train["bf16"] = False
    else:
        train["bf16"] = True
        conv.not_carried.append(f"trainer.mixed_precision={precision!r}: bf16 or fp32 only; bf16")
    ds = deepspeed or trainer.get("deepspeed")
    if ds:
        ds_path = Path(str(ds)).expanduser().resolve()
        if not ds_path.is_file():
            raise UsageError(f"--deepspeed {ds}: no such file")
        train["deepspeed"] = str(ds_path)
    if "max_epochs" in trainer:
        epochs = int(trainer["max_epochs"])
        if n_train:
            per_epoch = n_train // global_batch
            if per_epoch < 1:
                raise UsageError(
                    f"--instructions: {n_train} training samples are fewer than one global batch "
                    f"({global_batch} = {micro} x {accum} x world size {world_size})"
                )
            train["max_steps"] = epochs * per_epoch
        else:
            conv.not_carried.append(
                f"trainer.max_epochs={epochs}: train.max_steps needs the training files "
                "(--instructions) to count samples; left at the default"
            )
    for k in trainer:
        if k not in _TRAINER_MAPPED:
            why = _WHY_NOT.get(f"trainer.{k}", "unknown key")
            conv.not_carried.append(f"trainer.{k}: {why}")
    ck = bool(trainer.get("gradient_checkpointing", False))
    model_out["checkpointing"] = {"vision": ck, "language": ck}

    log: dict[str, Any] = {}
    if "logging_steps" in trainer:
        log["every_steps"] = int(trainer["logging_steps"])
    wandb = old.get("wandb") or {}
    if isinstance(wandb, dict):
        for k in wandb:
            if k.lower() == "api_key":
                conv.warnings.append(
                    "wandb.API_KEY: a W&B key is written in the old YAML; it is NOT copied. Rotate "
                    "it (it has been shared with the file) and give the new one as WANDB_API_KEY in "
                    "the environment"
                )
            elif k == "project":
                log["wandb_project"] = str(wandb[k])
            else:
                conv.not_carried.append(f"wandb.{k}: unknown key")
    for k in old:
        if k not in ("dataset", "model", "trainer", "seed", "wandb"):
            conv.not_carried.append(f"{k}: unknown key")

    data: dict[str, Any] = {"shards": shards}
    if instructions:
        data["train"] = [str(Path(f).expanduser().resolve()) for f in instructions]
    if eval_instructions:
        data["eval"] = [str(Path(f).expanduser().resolve()) for f in eval_instructions]
    conv.run = {
        "output_dir": output_dir,
        "data": data,
        "model": model_out,
        "train": train,
        **({"log": log} if log else {}),
    }
    check(conv)
    files = [str(f) for f in (*instructions, *eval_instructions)] or ["INSTRUCTIONS"]
    conv.commands = [
        shlex.join(["umbrella-pack", "manifest", "--instructions", *files, "--out", "subjects.csv"])
        + " [--phenotypes CSV] [--path-map OLD=NEW]",
        shlex.join(["umbrella-pack", "build", "--manifest", "subjects.csv", "--out", shards,
                    "--modalities", *chosen, *pack_flags]),
    ]  # fmt: skip
    return conv


def check(conv: Conversion) -> None:
    """Validate the result as umbrella-train will (a placeholder base where model.path is unset)."""
    raw = json.loads(json.dumps(conv.run))
    if conv.model_path_unset:
        raw["model"]["preset"] = "tiny"
    try:
        config_from_dict(_merge(RunConfig().to_dict(), raw))
    except ConfigError as exc:
        raise UsageError(f"the converted run config is invalid: {exc}") from exc


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict) and k != "modalities":
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def render(conv: Conversion, source: str | Path) -> str:
    """The run YAML: a comment header (source, base, not carried), then the keys."""
    lines = [f"# Converted from {source} by umbrella-train --from-umbrella-config."]
    if conv.model_path_unset:
        lines.append(
            "# model.path is UNSET: set it to a local copy of the pretrained base before training."
        )
    if conv.not_carried:
        lines.append("# Not carried:")
        lines += [f"#   {item}" for item in conv.not_carried]
    if conv.commands:
        lines.append("# Pack first:")
        lines += [f"#   {c}" for c in conv.commands]
    return (
        "\n".join(lines) + "\n" + yaml.safe_dump(conv.run, sort_keys=False, default_flow_style=None)
    )


def run(args: Any) -> int:
    """``umbrella-train --from-umbrella-config``: convert, write ``--out``, report; exit 0."""
    import sys

    from umbrella_ds.io import atomic_write_text

    if not args.out:
        raise UsageError("--from-umbrella-config needs --out RUN.yaml")
    conv = convert(
        read_old(args.from_umbrella_config),
        world_size=args.world_size,
        model_path=args.model_path,
        instructions=args.instructions or (),
        eval_instructions=args.eval_instructions or (),
        deepspeed=args.deepspeed,
        shards=args.shards,
        output_dir=f"runs/{Path(args.out).stem}",
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, render(conv, args.from_umbrella_config))
    for w in conv.warnings:
        print(f"umbrella-train: WARNING: {w}", file=sys.stderr)
    print(f"wrote {out}")
    if conv.not_carried:
        print("not carried:")
        for item in conv.not_carried:
            print(f"  {item}")
    print("pack the cohort with:")
    for c in conv.commands:
        print(f"  {c}")
    return 0
