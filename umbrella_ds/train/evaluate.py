"""Evaluation during (and after) training: teacher-forced loss, then greedy answers, per task.

Sharding: the eval set is grouped by task, and within a task rank r takes items r, r + world, ...
Every rank runs the same number of batches per task (a rank short of items runs a dummy batch
whose results are dropped), because under ZeRO-3 every forward is a collective. Results are
gathered to rank 0 with ``all_gather_object``; only rank 0 writes ``predictions.jsonl``.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from umbrella_ds.config import EvalConfig
from umbrella_ds.model import greedy_generate, model_forward_loss
from umbrella_ds.train.inputs import Inputs, to_device
from umbrella_ds.train.metrics import score


def task_name(item_or_task: Any) -> str:
    meta = item_or_task["metadata"] if isinstance(item_or_task, dict) else item_or_task.metadata
    ttype = item_or_task["task_type"] if isinstance(item_or_task, dict) else item_or_task.task_type
    return str((meta or {}).get("task") or ttype)


def evaluate(
    model: torch.nn.Module,
    inputs: Inputs,
    tokenizer,
    cfg: EvalConfig,
    micro_batch: int,
    *,
    rank: int,
    world_size: int,
    device: torch.device,
    all_modalities: tuple[str, ...],
    step: int,
    out_dir: Path,
) -> list[dict[str, Any]]:
    """In-training evaluation: the records (rank 0; [] elsewhere); rank 0 writes predictions."""
    records, preds = evaluate_set(
        model,
        inputs,
        tokenizer,
        cfg,
        micro_batch,
        rank=rank,
        world_size=world_size,
        device=device,
        all_modalities=all_modalities,
        step=step,
    )
    if rank == 0:
        _write_predictions(out_dir, step, preds)
    return records


@torch.no_grad()
def evaluate_set(
    model: torch.nn.Module,
    inputs: Inputs,
    tokenizer,
    cfg: EvalConfig,
    micro_batch: int,
    *,
    rank: int,
    world_size: int,
    device: torch.device,
    all_modalities: tuple[str, ...],
    step: int,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every rank calls this; rank 0 gets (eval records, prediction records), others ([], [])."""
    ds = inputs.eval_set
    assert ds is not None
    n = len(ds) if cfg.max_samples is None else min(len(ds), cfg.max_samples)
    by_task: dict[str, list[int]] = defaultdict(list)
    for i in range(n):
        by_task[task_name(ds.tasks[ds._items[i][0]])].append(i)
    was_training = model.training
    model.eval()
    preds: list[dict[str, Any]] = []
    loss_parts: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for task in sorted(by_task):
        idx = by_task[task]
        mine = idx[rank::world_size]
        n_batches = math.ceil(math.ceil(len(idx) / world_size) / micro_batch)
        for b in range(n_batches):
            chunk = mine[b * micro_batch : (b + 1) * micro_batch]
            dummy = not chunk
            items = [ds[(0, i)] for i in (chunk or idx[:1])]
            tb = to_device(inputs.collate_train(items), device)
            _, loss_sum = model_forward_loss(model, tb, 1.0, all_modalities=all_modalities)
            eb = to_device(inputs.collate_eval(items), device)
            ids = greedy_generate(
                model,
                eb["prompt_ids"],
                eb["attention_mask"],
                eb["images"],
                eb["image_positions"],
                cfg.max_new_tokens,
                inputs.eos_id,
                all_modalities=all_modalities,
            )
            if dummy:
                continue
            loss_parts[task][0] += float(loss_sum)
            loss_parts[task][1] += tb["num_loss_tokens"]
            for item, gen in zip(items, ids):
                preds.append(
                    {
                        "task": task,
                        "task_id": item["task_id"],
                        "subject_ids": item["subject_ids"],
                        "window_start": item["window_start"],
                        "answer": tokenizer.decode(gen, skip_special_tokens=True).strip(),
                        "target": item["target_text"].strip(),
                    }
                )
    if was_training:
        model.train()
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, (preds, dict(loss_parts)))
    if rank != 0:
        return [], []
    all_preds = [p for g in gathered for p in g[0]]
    all_preds.sort(key=lambda p: (p["task"], p["task_id"], str(p["window_start"])))
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for g in gathered:
        for task, (s, k) in g[1].items():
            totals[task][0] += s
            totals[task][1] += k
    per_task = score(all_preds)
    records = []
    for task, m in per_task.items():
        s, k = totals[task]
        records.append(
            {"split": "eval", "step": step, "task": task, "loss": s / k if k else None, **m}
        )
    s_all = sum(t[0] for t in totals.values())
    k_all = sum(t[1] for t in totals.values())
    accs = [r["accuracy"] for r in records if r.get("accuracy") is not None]
    summary = {
        "split": "eval",
        "step": step,
        "task": "all",
        "loss": s_all / k_all if k_all else None,
    }
    if accs:
        summary["accuracy"] = sum(accs) / len(accs)
    summary["count"] = len(all_preds)
    records.append(summary)
    return records, all_preds


def _write_predictions(out_dir: Path, step: int, preds: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(p) + "\n" for p in preds)
    step_dir = out_dir / "eval" / f"step-{step:07d}"
    step_dir.mkdir(parents=True, exist_ok=True)
    for path in (step_dir / "predictions.jsonl", out_dir / "predictions.jsonl"):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
