"""Answer parsing and per-task metrics, shared by in-training evaluation and ``umbrella-eval``.

The parser (documented because metrics are only as trustworthy as it is):

- Classification: the answer's first whole-word, case-insensitive match of a class word is its
  label. Class words come from the task's targets (e.g. ``female``, ``male``); longer words are
  tried first at each position, so ``female`` is never read as ``male`` (the whole-word rule also
  guarantees that). An answer with no class word is *unparseable*: it is counted and scored as
  wrong, never dropped.
- Regression: the first number in the answer (``-12``, ``3.5``, ``1e3``); none -> unparseable,
  counted, and left out of MAE and Pearson r (there is no number to score).
- A task is regression when every target parses as a number, classification otherwise.

The statistics themselves (balanced accuracy, AUROC, bootstrap intervals over subjects,
per-subject aggregation of rsfMRI windows) are defined in :mod:`umbrella_ds.train.stats`.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from umbrella_ds.train import stats

_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def parse_number(text: str) -> float | None:
    m = _NUMBER.search(text)
    return float(m.group()) if m else None


def parse_class(text: str, classes: Iterable[str]) -> str | None:
    """The class whose word appears first in ``text`` (whole word, case-insensitive)."""
    words = sorted({c.lower() for c in classes}, key=len, reverse=True)
    if not words:
        return None
    pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)
    m = pattern.search(text)
    return m.group(1).lower() if m else None


def target_label(target: str, classes: Iterable[str]) -> str:
    """The class of a reference answer (``"female."`` -> ``female``)."""
    label = parse_class(target, classes)
    return label if label is not None else target.strip().lower().rstrip(".")


def class_vocabulary(targets: Sequence[str]) -> list[str]:
    """Class words of a task: its distinct targets, trimmed of punctuation and case."""
    return sorted({re.sub(r"[^\w\s-]", "", t).strip().lower() for t in targets} - {""})


def is_regression(targets: Sequence[str]) -> bool:
    return bool(targets) and all(
        re.fullmatch(r"\s*" + _NUMBER.pattern + r"\s*\.?\s*", t) for t in targets
    )


def classification_metrics(preds: Sequence[str | None], labels: Sequence[str]) -> dict[str, Any]:
    return {
        "accuracy": stats.accuracy(preds, labels),
        "balanced_accuracy": stats.balanced_accuracy(preds, labels),
        "count": len(labels),
        "unparseable": sum(p is None for p in preds),
    }


def regression_metrics(preds: Sequence[float | None], targets: Sequence[float]) -> dict[str, Any]:
    return {
        "count": len(targets),
        "unparseable": sum(p is None for p in preds),
        "mae": stats.mae(preds, targets),
        "pearson_r": stats.pearson_r(preds, targets),
    }


def subject_of(record: dict[str, Any]) -> str | None:
    """The subject a record is about: ``subject``, else the last of ``subject_ids``, else None."""
    if record.get("subject"):
        return str(record["subject"])
    ids = record.get("subject_ids") or []
    return str(ids[-1]) if ids else None


def score(
    records: Sequence[dict[str, Any]], *, n_boot: int = stats.N_BOOT, seed: int = stats.SEED
) -> dict[str, dict[str, Any]]:
    """Per-task metrics from prediction records (``task``, ``answer``, ``target``; optional
    ``subject``/``subject_ids`` and, for classification, ``class_probs`` for AUROC).

    Adds ``parsed`` and ``label`` to each record in place, so predictions.jsonl shows how each
    answer was read. Each task gets its counts, point estimates and ``ci95`` (bootstrap over
    subjects), plus ``per_subject`` when some subject has several records (rsfMRI windows).
    """
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_task[r["task"]].append(r)
    results: dict[str, dict[str, Any]] = {}
    for task, recs in sorted(by_task.items()):
        targets = [r["target"] for r in recs]
        # A record without a subject is its own unit of resampling.
        subjects = [subject_of(r) or f"<record {i}>" for i, r in enumerate(recs)]
        if is_regression(targets):
            ys = [parse_number(t) for t in targets]
            ps = [parse_number(r["answer"]) for r in recs]
            for r, p, y in zip(recs, ps, ys):
                r["parsed"], r["label"] = p, y
            report = stats.regression_report(ps, ys, subjects, n_boot=n_boot, seed=seed)
            results[task] = {"kind": "regression", **report}
        else:
            classes = class_vocabulary(targets)
            ys = [target_label(t, classes) for t in targets]
            ps = [parse_class(r["answer"], classes) for r in recs]
            for r, p, y in zip(recs, ps, ys):
                r["parsed"], r["label"] = p, y
            probs = [r.get("class_probs") for r in recs]
            usable = all(p is not None and set(p) >= set(classes) for p in probs)
            report = stats.classification_report(
                ps,
                ys,
                subjects,
                classes=classes,
                probs=probs if usable else None,
                n_boot=n_boot,
                seed=seed,
            )
            results[task] = {"kind": "classification", **report}
    return results
