"""Evaluation during (and after) training: teacher-forced loss, then greedy answers, per task.

Sharding: the eval set is grouped by task, and within a task rank r takes items r, r + world, ...
Every rank runs the same number of batches per task (a rank short of items runs a dummy batch
whose results are dropped), because under ZeRO-3 every forward is a collective. Results are
gathered to rank 0 with ``all_gather_object``; only rank 0 writes ``predictions.jsonl``.

``evaluate_set`` is the whole computation and writes nothing; ``umbrella-eval`` calls it too, so a
checkpoint evaluated afterwards gives the numbers its run logged. For AUROC, each classification
task's class answers are reduced to their first answer token (the token greedy decoding must
choose first); a record's ``class_probs`` are the first step's softmax probabilities of those
tokens, renormalised over the classes. When two classes share a first token there is no such
score and AUROC is left out for that task (logged).
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from umbrella_ds.config import EvalConfig
from umbrella_ds.data.collate import to_device
from umbrella_ds.data.template import ChatTemplate, select_template
from umbrella_ds.io import atomic_write_text
from umbrella_ds.model import greedy_generate, model_forward_loss
from umbrella_ds.train.inputs import Inputs
from umbrella_ds.train.metrics import class_vocabulary, is_regression, score, target_label

log = logging.getLogger(__name__)


def task_name(item_or_task: Any) -> str:
    meta = item_or_task["metadata"] if isinstance(item_or_task, dict) else item_or_task.metadata
    ttype = item_or_task["task_type"] if isinstance(item_or_task, dict) else item_or_task.task_type
    return str((meta or {}).get("task") or ttype)


def answer_first_token(tokenizer, answer: str, template: ChatTemplate | None = None) -> int:
    """The first token of ``answer`` as the renderer tokenizes an assistant turn holding it, in
    the base model's template (None: derived from the tokenizer, as the Renderer does)."""
    template = template or select_template(tokenizer=tokenizer)
    return template.answer_ids(tokenizer, answer)[0]


def class_first_tokens(
    tokenizer, targets: list[str], template: ChatTemplate | None = None
) -> dict[str, int] | None:
    """class -> first answer token id, for a classification task's targets; None when the task
    is regression or two classes begin with the same token (no per-class score then)."""
    if is_regression(targets):
        return None
    classes = class_vocabulary(targets)
    votes: dict[str, Counter] = defaultdict(Counter)
    for t in targets:
        votes[target_label(t, classes)][answer_first_token(tokenizer, t.strip(), template)] += 1
    tokens = {c: votes[c].most_common(1)[0][0] for c in classes if votes[c]}
    if len(tokens) != len(classes) or len(set(tokens.values())) != len(tokens):
        log.warning("classes %s share a first answer token: no AUROC", classes)
        return None
    return tokens


def record_subject(item: dict[str, Any]) -> str:
    """The subject a sample is about: metadata.subject_id, else its last image's subject."""
    meta = item.get("metadata") or {}
    if meta.get("subject_id"):
        return str(meta["subject_id"])
    return str(item["subject_ids"][-1]) if item["subject_ids"] else str(item["task_id"])


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
    first_tokens = {
        task: class_first_tokens(
            tokenizer, [ds.tasks[ds._items[i][0]].turns[-1].text for i in idx], inputs.template
        )
        for task, idx in by_task.items()
    }
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
            ids, first_logits = greedy_generate(
                model,
                eb["prompt_ids"],
                eb["attention_mask"],
                eb["images"],
                eb["image_positions"],
                cfg.max_new_tokens,
                inputs.eos_id,
                all_modalities=all_modalities,
                return_first_step_logits=True,
            )
            if dummy:
                continue
            class_probs: list[dict[str, float] | None] = [None] * len(items)
            tokens = first_tokens[task]
            if tokens is not None:
                p = torch.softmax(first_logits.float(), dim=-1)[:, list(tokens.values())].double()
                p = (p / p.sum(dim=-1, keepdim=True)).cpu().tolist()
                class_probs = [dict(zip(tokens, row)) for row in p]
            loss_parts[task][0] += float(loss_sum)
            loss_parts[task][1] += tb["num_loss_tokens"]
            for item, gen, probs in zip(items, ids, class_probs):
                rec = {
                    "task": task,
                    "task_id": item["task_id"],
                    "subject": record_subject(item),
                    "subject_ids": item["subject_ids"],
                    "window_start": item["window_start"],
                    "answer": tokenizer.decode(gen, skip_special_tokens=True).strip(),
                    "target": item["target_text"].strip(),
                }
                if probs is not None:
                    rec["class_probs"] = probs
                preds.append(rec)
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
    summary: dict[str, Any] = {
        "split": "eval",
        "step": step,
        "task": "all",
        "loss": s_all / k_all if k_all else None,
    }
    # Means over the classification tasks that have the metric (what checkpoint.keep_best can name).
    for key in ("accuracy", "balanced_accuracy", "auroc"):
        values = [r[key] for r in records if r.get(key) is not None]
        if values:
            summary[key] = sum(values) / len(values)
    summary["count"] = len(all_preds)
    records.append(summary)
    return records, all_preds


def _write_predictions(out_dir: Path, step: int, preds: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(p) + "\n" for p in preds)
    step_dir = out_dir / "eval" / f"step-{step:07d}"
    step_dir.mkdir(parents=True, exist_ok=True)
    for path in (step_dir / "predictions.jsonl", out_dir / "predictions.jsonl"):
        atomic_write_text(path, text)
