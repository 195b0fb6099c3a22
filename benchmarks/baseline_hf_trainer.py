"""Baseline for `train_cpu`: the same patched model trained the way the predecessor trained it.

HF `Trainer` + the same DeepSpeed JSON (`ds_configs/zero2.json`, whose "auto" values HF fills
from TrainingArguments, as it does for any user) and one of two data paths:

- ``--mode predecessor``: the predecessor's path. Every access decodes the subject's NIfTI
  (`<raw>/t1/<subjectkey>.nii.gz`, the flat folder its users have) with nibabel, resizes it to the
  model's grid with area interpolation and z-scores it, in the main process (no workers); every
  sample is padded to a fixed length (``--pad-to``, default 2048); the loss is HF's
  (full-vocabulary logits at every position, labels shifted inside the model).
- ``--mode like_for_like``: our data path (InstructionDataset over the packed shards, dynamic
  padding via `collate_train`) and our loss (`model_forward_loss`, logits only at supervised
  positions), still under HF Trainer. Against the engine, this isolates engine overhead.

Started by the deepspeed launcher (one process per rank):
``deepspeed --num_gpus 2 benchmarks/baseline_hf_trainer.py --mode predecessor --raw R --out F``.
Rank 0 writes ``--out`` (JSON): the wall time at the end of every optimizer step, samples per
step and the mean non-pad tokens per sample, from which `train_cpu` derives samples/s and tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DS_CONFIG = Path(__file__).resolve().parents[1] / "ds_configs" / "zero2.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--mode", choices=("predecessor", "like_for_like"), required=True)
    p.add_argument(
        "--raw", type=Path, required=True, help="umbrella-pack synth output (NIfTI + instructions)"
    )
    p.add_argument("--shards", type=Path, help="packed shards (like_for_like)")
    p.add_argument(
        "--task",
        default="t1_sex",
        help="instruction file stem: <raw>/instructions/<task>_train.jsonl",
    )
    p.add_argument("--size", type=int, nargs=3, default=(32, 32, 32), help="T1 grid of the model")
    p.add_argument("--patch", type=int, nargs=3, default=(8, 8, 8))
    p.add_argument("--preset", default="tiny")
    p.add_argument("--pad-to", type=int, default=2048, help="fixed sequence length (predecessor)")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--accumulation", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--deepspeed", type=Path, default=DS_CONFIG)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="JSON with the step end times (rank 0)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


class PredecessorT1(torch.utils.data.Dataset):
    """NIfTI decoded, resized (area) and z-scored on every access; samples padded to a fixed length."""

    def __init__(
        self, tasks, raw: Path, renderer, size: tuple[int, int, int], pad_to: int, pad_id: int
    ):
        self.tasks, self.raw, self.size, self.pad_to, self.pad_id = (
            tasks,
            raw,
            tuple(size),
            pad_to,
            pad_id,
        )
        self.rendered = [renderer.render_train(t) for t in tasks]
        for t, r in zip(tasks, self.rendered):
            if len(t.images) != 1 or t.images[0].modality != "T1":
                raise ValueError(
                    f"task {t.task_id}: the predecessor baseline handles one T1 image per task"
                )
            if len(r.input_ids) > pad_to:
                raise ValueError(
                    f"task {t.task_id}: {len(r.input_ids)} tokens exceed --pad-to {pad_to}"
                )

    def __len__(self) -> int:
        return len(self.tasks)

    def real_tokens(self) -> float:
        return float(np.mean([len(r.input_ids) for r in self.rendered]))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        subject = self.tasks[i].images[0].subject_id
        path = self.raw / "t1" / f"{subject}.nii.gz"
        vol = np.asarray(nib.load(str(path)).get_fdata(dtype=np.float32))
        x = torch.from_numpy(vol)[None, None]
        x = F.interpolate(x, size=self.size, mode="area")[0, 0]  # MONAI Resize(mode="area")
        x = (x - x.mean()) / x.std(correction=0)
        r = self.rendered[i]
        n = len(r.input_ids)
        ids = torch.full((self.pad_to,), self.pad_id, dtype=torch.long)
        labels = torch.full((self.pad_to,), -100, dtype=torch.long)
        mask = torch.zeros(self.pad_to, dtype=torch.long)
        ids[:n] = torch.from_numpy(r.input_ids)
        labels[:n] = torch.from_numpy(r.labels)
        mask[:n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": x}


class SupervisedLoss(nn.Module):
    """Our loss under HF Trainer: `Trainer` calls ``model(**batch)`` and reads ``loss``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **batch):
        from umbrella_ds.model import model_forward_loss

        loss, _ = model_forward_loss(self.model, batch, batch["num_loss_tokens"])
        return {"loss": loss}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from umbrella_ds.data import InstructionDataset, Renderer, collate_train, load_instructions
    from umbrella_ds.model import build_model, image_token_id, num_image_tokens

    spec = {"T1": {"size": list(args.size), "patch": list(args.patch)}}
    model, tok = build_model(args.preset, modalities=spec, seed=args.seed)
    tpi = {"T1": num_image_tokens(model, "T1")}
    tasks = load_instructions(args.raw / "instructions" / f"{args.task}_train.jsonl")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    collator = None
    if args.mode == "predecessor":
        renderer = Renderer(tok, tpi, max_length=args.pad_to)
        dataset = PredecessorT1(
            tasks, args.raw, renderer, tuple(args.size), args.pad_to, int(pad_id)
        )
        real_tokens = dataset.real_tokens()
        trained: nn.Module = model
    else:
        if args.shards is None:
            raise SystemExit("--mode like_for_like needs --shards")
        renderer = Renderer(tok, tpi, max_length=args.pad_to)
        dataset = InstructionDataset(
            tasks, args.shards, renderer, train=True, seed=args.seed, series_length=1, flip=False
        )
        real_tokens = float(np.mean([len(r.input_ids) for r in dataset._rendered]))
        collator = partial(
            collate_train,
            pad_id=int(pad_id),
            image_token_id=image_token_id(model),
            tokens_per_image=tpi,
        )
        trained = SupervisedLoss(model)

    ds_cfg = json.loads(args.deepspeed.read_text())
    targs = TrainingArguments(
        output_dir=str(args.out.parent / f"hf-{args.mode}"),
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.accumulation,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=True,
        use_cpu=not torch.cuda.is_available(),  # HF refuses bf16 on CPU otherwise
        deepspeed=ds_cfg,
        dataloader_num_workers=0,  # the predecessor loaded data in the main process
        logging_steps=10**9,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        seed=args.seed,
        disable_tqdm=True,
    )
    step_ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            step_ends.append(time.perf_counter())

    trainer = Trainer(
        model=trained,
        args=targs,
        train_dataset=dataset,
        data_collator=collator,
        callbacks=[StepClock()],
    )
    start = time.perf_counter()
    trainer.train()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if int(os.environ.get("RANK", "0")) == 0:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "mode": args.mode,
            "world_size": world,
            "samples_per_step": args.micro_batch * args.accumulation * world,
            "real_tokens_per_sample": real_tokens,
            "padded_tokens_per_sample": args.pad_to if args.mode == "predecessor" else None,
            "train_start": start,
            "step_ends": step_ends,
            "resolved_ds_config": _jsonable(
                trainer.accelerator.state.deepspeed_plugin.deepspeed_config
            )
            if getattr(trainer.accelerator.state, "deepspeed_plugin", None)
            else None,
        }
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, args.out)
    return 0


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


if __name__ == "__main__":
    sys.exit(main())
