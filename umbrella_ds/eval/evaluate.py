"""Evaluation during (and after) training: teacher-forced loss, greedy answers, likelihood choice.

Sharding: the eval set is grouped by task, and within a task rank r takes items r, r + world, ...
Every rank runs the same number of batches per task (a rank short of items runs a dummy batch
whose results are dropped), and every batch the same number of forwards (one for loss and
prefill, one per class for a likelihood task, max_new_tokens - 1 decode steps), because under
ZeRO-3 every forward is a collective. Results are gathered to rank 0 with ``all_gather_object``;
only rank 0 writes ``predictions.jsonl``.

``evaluate_set`` is the whole computation and writes nothing; ``umbrella-eval`` calls it too, so a
checkpoint evaluated afterwards gives the numbers its run logged.

Per batch (``model/generate.py``): one forward over prompt + reference answer gives the loss, the
first decoding step's logits and the prompt's KV cache; greedy decoding and the candidate
answers continue from that cache. Batches are read and collated by the training loader's
construction (workers, pinned memory; ``eval_batches.py``). Evaluation runs eager even when
``train.compile=blocks``: a compiled block recompiles for every KV-cache length of decoding.

What a classification task's records are scored against is decided per task
(``metrics.task_labels``: metadata labels or reference answers). Class scores, for AUROC and the
likelihood choice, come from one of two methods, named in every record's ``method``:

- ``first_token``: where each reference answer is its class word (``female.``) and the classes
  begin with different answer tokens, a record's ``class_probs`` are the first decoding step's
  softmax probabilities of those tokens, renormalised over the classes. Exact there (greedy
  decoding picks the class at that step) and free (the prefill computed those logits).
- ``likelihood`` (lm-evaluation-harness style): otherwise, where each record's label is a word of
  its reference answer. For each class c the candidate is the record's own reference answer with
  every whole-word occurrence of its label replaced by c (``metrics.candidate``); its score is the
  summed log-likelihood of the candidate's answer tokens (and turn end) under teacher forcing.
  The argmax is the record's ``choice``; ``class_probs`` are the softmax over the scores. For a
  task whose references are sentences the choice is the primary accuracy.

Generation length: ``eval.max_new_tokens`` ("derived" by default: per task, the longest tokenized
reference answer or class word, capped at ``config.DERIVED_MAX_NEW_TOKENS_CAP``). A reference
longer than the length used is warned about once per task, with the numbers; a generated answer
that hit the length without its end token is marked ``cut`` in its record.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from umbrella_ds.config import DERIVED_MAX_NEW_TOKENS_CAP, EvalConfig
from umbrella_ds.data import build_loader
from umbrella_ds.data.collate import to_device
from umbrella_ds.data.template import ChatTemplate, select_template
from umbrella_ds.eval.eval_batches import EvalBatches, Planned, unwrap
from umbrella_ds.eval.metrics import (
    DEFAULT_LABEL_FIELD,
    TaskLabels,
    candidate,
    class_vocabulary,
    has_word,
    is_regression,
    score,
    target_label,
    task_labels,
)
from umbrella_ds.io import atomic_write_text
from umbrella_ds.model.generate import continuation_logprobs, decode_greedy, prefill_with_loss
from umbrella_ds.train.inputs import Inputs

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
    tokenizer,
    targets: list[str],
    template: ChatTemplate | None = None,
    labels: TaskLabels | None = None,
) -> dict[str, int] | None:
    """class -> first answer token id, for a classification task's targets; None when the task
    is regression or two classes begin with the same token (no first-token score then).

    Each class's token is the most common first token of its records' reference answers (the
    class word itself where the references are empty); ``labels`` default to today's rule."""
    if is_regression(targets):
        return None
    if labels is None:
        classes = class_vocabulary(targets)
        ys = [target_label(t, classes) for t in targets]
    else:
        classes, ys = labels.classes, [str(y) for y in labels.labels]
    votes: dict[str, Counter] = defaultdict(Counter)
    for t, y in zip(targets, ys):
        votes[y][answer_first_token(tokenizer, t.strip() or y, template)] += 1
    tokens = {c: votes[c].most_common(1)[0][0] for c in classes if votes[c]}
    if len(tokens) != len(classes) or len(set(tokens.values())) != len(tokens):
        log.info("classes %s share a first answer token: no first-token scores", classes)
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


_WARNED: set[tuple[str, int, int]] = set()


@dataclass
class TaskPlan:
    """How one task is scored; the same on every rank (computed from all of the task's items)."""

    labels: TaskLabels
    label_field: str
    method: str | None  # "first_token" | "likelihood" | None (regression, or no class scores)
    first_tokens: dict[str, int] | None
    max_new_tokens: int
    longest_reference: int  # answer tokens (with the turn end) of the longest reference answer
    candidates: dict[int, dict[str, tuple[int, ...]]] = field(default_factory=dict)


def plan_task(
    task: str, idx: list[int], ds, tokenizer, template: ChatTemplate, cfg: EvalConfig
) -> TaskPlan:
    """Labels, scoring method, candidates and generation length of one task (module docstring)."""
    tasks = [ds.tasks[ds._items[i][0]] for i in idx]
    targets = [t.turns[-1].text for t in tasks]
    fld = cfg.label_field.get(task, DEFAULT_LABEL_FIELD)
    labels = task_labels(targets, [(t.metadata or {}).get(fld) for t in tasks], fld)
    ids_of: dict[str, tuple[int, ...]] = {}

    def answer_ids(text: str) -> tuple[int, ...]:
        if text not in ids_of:
            ids_of[text] = tuple(template.answer_ids(tokenizer, text))
        return ids_of[text]

    longest = max(len(answer_ids(t)) for t in [*targets, *labels.classes])
    method, first, candidates = None, None, {}
    if labels.kind == "classification":
        ys = [str(y) for y in labels.labels]
        if not labels.sentences:
            first = class_first_tokens(tokenizer, targets, template, labels)
        if first is not None:
            method = "first_token"
        elif all(has_word(t, y) for t, y in zip(targets, ys)):
            method = "likelihood"
            candidates = {
                i: {c: answer_ids(candidate(t, y, c)) for c in labels.classes}
                for i, t, y in zip(idx, targets, ys)
            }
    max_new = cfg.max_new_tokens_or(min(longest, DERIVED_MAX_NEW_TOKENS_CAP))
    if longest > max_new and (task, longest, max_new) not in _WARNED:
        _WARNED.add((task, longest, max_new))
        n_long = sum(len(answer_ids(t)) > max_new for t in targets)
        log.warning(
            "task %s: %d of %d reference answers are longer than the generation length "
            "(longest %d tokens, generating %d; eval.max_new_tokens=%s): generated answers are "
            "cut before they end",
            task, n_long, len(targets), longest, max_new, cfg.max_new_tokens,
        )  # fmt: skip
    return TaskPlan(labels, fld, method, first, max_new, longest, candidates)


def _plan_batches(
    by_task: dict[str, list[int]],
    plans: dict[str, TaskPlan],
    micro_batch: int,
    rank: int,
    world_size: int,
) -> list[Planned]:
    """This rank's batches: the same number per task on every rank, dummies where short."""
    out: list[Planned] = []
    for task in sorted(by_task):
        idx, plan = by_task[task], plans[task]
        mine = idx[rank::world_size]
        n_batches = math.ceil(math.ceil(len(idx) / world_size) / micro_batch)
        for b in range(n_batches):
            chunk = mine[b * micro_batch : (b + 1) * micro_batch]
            use = chunk or idx[:1]
            cands = (
                {c: tuple(plan.candidates[i][c] for i in use) for c in plan.labels.classes}
                if plan.method == "likelihood"
                else {}
            )
            out.append(Planned(task, tuple(use), not chunk, cands))
    return out


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
    plans = {
        task: plan_task(task, idx, ds, tokenizer, inputs.template, cfg)
        for task, idx in by_task.items()
    }
    planned = _plan_batches(by_task, plans, micro_batch, rank, world_size)
    loader = build_loader(
        EvalBatches(ds, planned, inputs.collate_eval.keywords),
        range(len(planned)),  # type: ignore[arg-type]
        unwrap,
        batch_size=1,
        num_workers=inputs.num_workers,
        pin_memory=True,
        persistent_workers=False,
    )
    was_training = model.training
    model.eval()
    preds: list[dict[str, Any]] = []
    loss_parts: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    # Eager: compiled blocks would recompile for every KV-cache length of decoding.
    with torch.compiler.set_stance("force_eager"):
        for job, batch in zip(planned, loader, strict=True):
            plan = plans[job.task]
            b = to_device(batch, device)
            pre = prefill_with_loss(model, b, all_modalities)
            scores = {
                c: continuation_logprobs(model, pre, *batch["candidates"][c])
                for c in plan.labels.classes
                if plan.method == "likelihood"
            }
            gen, cut = decode_greedy(
                model, pre.cache, pre.mask, pre.last_pos, pre.first_logits,
                plan.max_new_tokens, inputs.eos_id,
            )  # fmt: skip
            if job.dummy:
                continue
            loss_parts[job.task][0] += float(pre.loss_sum)
            loss_parts[job.task][1] += batch["num_loss_tokens"]
            class_probs, choices, score_rows = _class_scores(plan, pre.first_logits, scores)
            for k, (item, ids) in enumerate(zip(batch["items"], gen)):
                rec: dict[str, Any] = {
                    "task": job.task,
                    "task_id": item["task_id"],
                    "subject": record_subject(item),
                    "subject_ids": item["subject_ids"],
                    "window_start": item["window_start"],
                    "answer": tokenizer.decode(ids, skip_special_tokens=True).strip(),
                    "cut": cut[k],
                    "target": item["target_text"].strip(),
                    "method": plan.method,
                }
                meta_label = (item["metadata"] or {}).get(plan.label_field)
                if meta_label is not None:
                    rec["meta_label"], rec["label_field"] = meta_label, plan.label_field
                if class_probs is not None:
                    rec["class_probs"] = class_probs[k]
                if choices is not None:
                    rec["choice"], rec["scores"] = choices[k], score_rows[k]
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
        plan = plans[task]
        records.append(
            {
                "split": "eval",
                "step": step,
                "task": task,
                "loss": s / k if k else None,
                **m,
                "max_new_tokens": plan.max_new_tokens,
                "longest_reference_tokens": plan.longest_reference,
            }
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


def _class_scores(
    plan: TaskPlan, first_logits: torch.Tensor, scores: dict[str, torch.Tensor]
) -> tuple[list[dict[str, float]] | None, list[str] | None, list[dict[str, float]] | None]:
    """Per record: class probabilities, and for the likelihood method the choice and the
    summed log-likelihood of each class's candidate."""
    if plan.method == "first_token":
        tokens = plan.first_tokens
        assert tokens is not None
        p = torch.softmax(first_logits.float(), dim=-1)[:, list(tokens.values())].double()
        p = (p / p.sum(dim=-1, keepdim=True)).cpu().tolist()
        return [dict(zip(tokens, row)) for row in p], None, None
    if plan.method == "likelihood":
        classes = plan.labels.classes
        ll = torch.stack([scores[c] for c in classes], dim=1).cpu()  # (B, K) float64
        probs = torch.softmax(ll, dim=1).tolist()
        choice = [classes[int(j)] for j in ll.argmax(dim=1)]
        rows = [dict(zip(classes, r)) for r in ll.tolist()]
        return [dict(zip(classes, r)) for r in probs], choice, rows
    return None, None, None


def _write_predictions(out_dir: Path, step: int, preds: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(p) + "\n" for p in preds)
    step_dir = out_dir / "eval" / f"step-{step:07d}"
    step_dir.mkdir(parents=True, exist_ok=True)
    for path in (step_dir / "predictions.jsonl", out_dir / "predictions.jsonl"):
        atomic_write_text(path, text)
