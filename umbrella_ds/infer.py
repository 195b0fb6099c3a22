"""``umbrella-infer``: answers of a trained model for new, unpacked scans.

    umbrella-infer --model EXPORT_DIR --prompt TEXT --scan T1=sub-01_T1w.nii.gz [--scan ...] [--out FILE]
                   [--device auto|cpu|cuda]

Why it gives the answer evaluation would give: the export carries everything that shaped the
training inputs (``export.json``: the preprocessing parameters the shards were packed with, the
base model's identity and a hash of its frozen weights, the run config; ``tokenizer/``). A scan
goes through ``umbrella_ds.scan.preprocess`` with those parameters (the packing code itself),
then through the evaluation path: the same instruction parser, renderer, dataset item, collate
and greedy decoding (no sampling), with an in-memory reader in place of the shards.

The prompt is read as an instruction file's user turn is: each ``<image>`` in it stands for one
``--scan``, in the order the ``--scan`` flags are given (``--prompt "<image> What is the sex of
this subject?"``). A prompt without ``<image>`` gets the images before it, in the order given
(the layout of the synthetic and predecessor instruction files). A count that differs from the
number of scans is refused. rsfMRI is windowed as evaluation windows it (the run's
``data.windows``): one answer per window, and the majority answer when there are several.

``--device`` follows the training rule (``train/env.py`` ``choose_device``): ``auto`` (the default)
uses a GPU where there is one and the CPU where there is none, and refuses where GPUs are
allocated but this torch cannot use them; ``cpu`` and ``cuda`` ask for one.

Errors are one line and exit status 2 (umbrella_ds/errors.py), early: a device that cannot be
used, a base model whose weights
do not hash to what the export was trained on, an export without recorded preprocessing, a
modality the model was not trained on, a preprocessing grid that does not match the model's
input size, a scan packing would reject, a prompt whose placeholders do not match the scans.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from umbrella_ds import errors
from umbrella_ds import modality as modality_table
from umbrella_ds.errors import UserError, add_debug_flag, run_main

log = logging.getLogger("umbrella_ds.infer")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, errors.EXIT_FAILED, errors.EXIT_USAGE


class InferError(UserError):
    """The model, a scan, the prompt or the export's records do not fit together; the message
    says how (exit status 2)."""


class ScanReader:
    """What InstructionDataset reads from (duck-typed like the shard reader), in memory."""

    def __init__(self, volumes: dict[str, dict[str, np.ndarray]]) -> None:
        self.volumes = volumes  # subject -> modality -> float16 array (reader layout)

    def read(self, subject: str, modality: str) -> np.ndarray:
        return self.volumes[subject][modality]

    def read_window(self, subject: str, modality: str, start: int, length: int) -> np.ndarray:
        return self.volumes[subject][modality][..., start : start + length]

    def num_frames(self, subject: str, modality: str | None = None) -> int:
        if modality is None:  # the scan's series modality (one scan per subject here)
            modality = next(m for m in self.volumes[subject] if modality_table.get(m).is_series)
        return int(self.volumes[subject][modality].shape[-1])


def parse_scan(text: str) -> tuple[str, Path]:
    from umbrella_ds.data import normalize_modality

    if "=" not in text:
        raise InferError(f"--scan {text!r}: expected MODALITY=PATH (e.g. T1=sub-01_T1w.nii.gz)")
    mod, path = text.split("=", 1)
    try:
        modality = normalize_modality(mod.strip())
    except KeyError:
        known = ", ".join(modality_table.names())
        raise InferError(f"--scan {text!r}: unknown modality {mod!r} ({known})") from None
    return modality, Path(path).expanduser()


def preprocess_scans(
    scans: list[tuple[str, Path]],
    params: dict[str, Any] | None,
    modalities: dict[str, dict[str, list[int]]],
) -> dict[str, dict[str, np.ndarray]]:
    """Each scan -> the array packing would have stored, checked against the model's input grid
    (`params`: the export's preprocessing; `modalities`: its recipe's)."""
    from umbrella_ds.scan.preprocess import preprocess
    from umbrella_ds.scan.readers import InputRejected

    if not params:
        raise InferError(
            "the export records no preprocessing parameters (made by an older umbrella-export?): "
            "re-export the checkpoint so new scans can be preprocessed exactly as the training data"
        )
    volumes: dict[str, dict[str, np.ndarray]] = {}
    for k, (modality, path) in enumerate(scans):
        if modality not in modalities:
            raise InferError(
                f"--scan {modality}={path}: the model was trained on {sorted(modalities)}"
            )
        if modality not in params:
            raise InferError(
                f"--scan {modality}={path}: the training shards hold no {modality} preprocessing "
                f"(have {sorted(params)})"
            )
        grid = list(params[modality]["size"])
        want = list(modalities[modality]["size"])[:3]
        if grid != want:
            raise InferError(
                f"preprocessing mismatch for {modality}: packing resized to {grid} but the model's "
                f"patch embedding expects {want}"
            )
        if not path.exists():
            raise InferError(f"--scan {modality}={path}: no such file or folder")
        try:
            arr = preprocess(modality, path, params)
        except InputRejected as exc:
            raise InferError(
                f"--scan {modality}={path}: rejected as packing would: {exc.reason}"
            ) from exc
        volumes[f"scan{k}"] = {modality: arr}
    return volumes


def build_task(prompt: str, scans: list[tuple[str, Path]]):
    """The instruction record an instruction file would hold, parsed by the same parser.

    With ``<image>`` in the prompt the record is the predecessor's form (a text turn with
    placeholders, the images declared in order), so each placeholder takes the next scan where
    the user put it; without, the images are parts before the text, as the synthetic files have
    them."""
    from umbrella_ds.data import parse_task
    from umbrella_ds.data.instructions import IMAGE_PLACEHOLDER

    n = prompt.count(IMAGE_PLACEHOLDER)
    if n and n != len(scans):
        raise InferError(
            f"--prompt: {n} {IMAGE_PLACEHOLDER} placeholder(s) but {len(scans)} --scan(s); put "
            f"one {IMAGE_PLACEHOLDER} per --scan, in the order of the --scan flags, or none (the "
            "images then come before the prompt)"
        )
    record: dict[str, Any] = {
        "task_id": "infer",
        "task_type": "T1" if len(scans) == 1 else "T3",
        "subject_ids": [f"scan{k}" for k in range(len(scans))],
        "metadata": {"task": "infer"},
    }
    if n:
        record["images"] = [{"modality": m, "path": str(p)} for m, p in scans]
        user: Any = prompt
    else:
        images = [{"type": "image", "modality": m, "image_path": str(p)} for m, p in scans]
        user = [*images, {"type": "text", "text": prompt}]
    record["conversations"] = [
        {"role": "user", "content": user},
        {"role": "assistant", "content": [{"type": "text", "text": ""}]},
    ]
    return parse_task(record, "<umbrella-infer>")


def infer(
    export_dir: str | os.PathLike[str],
    prompt: str,
    scans: list[tuple[str, Path]],
    *,
    base: str | None = None,
    max_new_tokens: int | None = None,
    device: Any = None,
) -> dict[str, Any]:
    """Answer ``prompt`` about ``scans`` with the exported model (on ``device``, a torch.device;
    default the CPU); returns the answer record."""
    import torch

    from umbrella_ds.config import DERIVED_MAX_NEW_TOKENS_CAP
    from umbrella_ds.data import InstructionDataset, Renderer, collate_eval
    from umbrella_ds.data.collate import to_device
    from umbrella_ds.data.template import template_of
    from umbrella_ds.model import greedy_generate, image_token_id
    from umbrella_ds.train import trained
    from umbrella_ds.train.base_weights import BaseMismatchError
    from umbrella_ds.train.factory import cast_like_deepspeed
    from umbrella_ds.train.trained import EXPORT_INFO

    export_dir = Path(export_dir)
    if not (export_dir / EXPORT_INFO).is_file():
        raise InferError(
            f"--model {export_dir}: no {EXPORT_INFO} (not an umbrella-export directory)"
        )
    if not scans:
        raise InferError("--scan: give at least one --scan MODALITY=PATH")
    task = build_task(prompt, scans)  # a placeholder count that does not fit fails before loading
    found = trained.locate(export_dir)
    info, cfg = found.record, found.config
    modalities = found.recipe.modality_specs()
    volumes = preprocess_scans(scans, info.get("preprocessing"), modalities)
    try:
        model, tokenizer, _ = trained.load(found, base=base)
    except BaseMismatchError as exc:
        raise InferError(str(exc)) from exc
    cast_like_deepspeed(model, cfg.train.bf16)  # the dtype evaluation ran in
    device = torch.device("cpu") if device is None else device
    model.to(device)
    tokens = {m: int(n) for m, n in info["tokens_per_image"].items()}
    template = template_of(model)  # the base model's, as training rendered with
    renderer = Renderer(
        tokenizer, tokens, cfg.data.max_length, cfg.data.overflow, template=template
    )
    ds = InstructionDataset(
        [task],
        ScanReader(volumes),
        renderer,
        train=False,
        seed=cfg.train.seed,
        series_length=modality_table.window_length(modalities),
        window_stride=cfg.data.window_stride,
        windows=cfg.data.windows,
        flip=False,
    )
    if len(ds) == 0:
        raise InferError(
            f"prompt + images longer than data.max_length={cfg.data.max_length} tokens"
        )
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    eos_id = template.eos_id(tokenizer)
    n_new = max_new_tokens or cfg.eval.max_new_tokens_or(DERIVED_MAX_NEW_TOKENS_CAP)
    answers = []
    with torch.no_grad():
        for i in range(len(ds)):
            item = ds[(0, i)]
            batch = collate_eval(
                [item],
                pad_id=int(pad_id),
                image_token_id=image_token_id(model),
                tokens_per_image=tokens,
            )
            batch = to_device(batch, device)
            ids = greedy_generate(
                model,
                batch["prompt_ids"],
                batch["attention_mask"],
                batch["images"],
                batch["image_positions"],
                n_new,
                int(eos_id),
                all_modalities=tuple(modalities),
            )
            answers.append(
                {
                    "answer": tokenizer.decode(ids[0], skip_special_tokens=True).strip(),
                    "window_start": item["window_start"],
                }
            )
    votes = Counter(a["answer"] for a in answers)
    return {
        "prompt": prompt,
        "scans": [{"modality": m, "path": str(p)} for m, p in scans],
        "answer": votes.most_common(1)[0][0] if len(answers) > 1 else answers[0]["answer"],
        "windows": answers if len(answers) > 1 else None,
        "model": str(export_dir.resolve()),
        "step": info.get("step"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    from umbrella_ds.train import env

    p = argparse.ArgumentParser(prog="umbrella-infer", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="umbrella-export directory")
    p.add_argument(
        "--prompt",
        required=True,
        help="the question; each <image> in it takes the next --scan, and without any the "
        "images come before it",
    )
    p.add_argument(
        "--scan",
        action="append",
        required=True,
        metavar="MODALITY=PATH",
        help="a raw scan: T1=file.nii.gz, rsfMRI=4d.nii.gz or rsfMRI=frame_folder; repeatable",
    )
    p.add_argument("--out", default=None, help="also write the answer record (JSON) here")
    p.add_argument("--base", default=None, help="frozen base (preset or local dir), if moved")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's eval value")
    env.add_device_flag(p)
    add_debug_flag(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="umbrella-infer: %(message)s")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise InferError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    device = env.apply_device_rule(args.device, "--device")
    from umbrella_ds.train.preflight import check_base

    check_base(args.base)
    scans = [parse_scan(s) for s in args.scan]
    result = infer(
        args.model, args.prompt, scans, base=args.base, max_new_tokens=args.max_new_tokens,
        device=device,
    )  # fmt: skip
    text = json.dumps(result, indent=1)
    if args.out:
        from umbrella_ds.io import atomic_write_text

        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, text + "\n")
    print(result["answer"])
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
