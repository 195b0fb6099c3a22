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
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

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
    n = len(labels)
    correct = sum(p == y for p, y in zip(preds, labels))
    recalls = []
    for cls in sorted(set(labels)):
        idx = [i for i, y in enumerate(labels) if y == cls]
        recalls.append(sum(preds[i] == cls for i in idx) / len(idx))
    return {
        "accuracy": correct / n if n else None,
        "balanced_accuracy": sum(recalls) / len(recalls) if recalls else None,
        "count": n,
        "unparseable": sum(p is None for p in preds),
    }


def regression_metrics(preds: Sequence[float | None], targets: Sequence[float]) -> dict[str, Any]:
    pairs = [(p, y) for p, y in zip(preds, targets) if p is not None]
    out: dict[str, Any] = {
        "count": len(targets),
        "unparseable": len(targets) - len(pairs),
        "mae": None,
        "pearson_r": None,
    }
    if pairs:
        out["mae"] = sum(abs(p - y) for p, y in pairs) / len(pairs)
    if len(pairs) >= 2:
        xs, ys = zip(*pairs)
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        sxy = sum((x - mx) * (y - my) for x, y in pairs)
        sxx = sum((x - mx) ** 2 for x in xs)
        syy = sum((y - my) ** 2 for y in ys)
        out["pearson_r"] = sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None
    return out


def score(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per-task metrics from prediction records (``task``, ``answer``, ``target``).

    Adds ``parsed`` and ``label`` to each record in place, so predictions.jsonl shows how each
    answer was read.
    """
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_task[r["task"]].append(r)
    results: dict[str, dict[str, Any]] = {}
    for task, recs in sorted(by_task.items()):
        targets = [r["target"] for r in recs]
        if is_regression(targets):
            ys = [parse_number(t) for t in targets]
            ps = [parse_number(r["answer"]) for r in recs]
            for r, p, y in zip(recs, ps, ys):
                r["parsed"], r["label"] = p, y
            results[task] = {"kind": "regression", **regression_metrics(ps, ys)}
        else:
            classes = class_vocabulary(targets)
            ys = [target_label(t, classes) for t in targets]
            ps = [parse_class(r["answer"], classes) for r in recs]
            for r, p, y in zip(recs, ps, ys):
                r["parsed"], r["label"] = p, y
            results[task] = {"kind": "classification", **classification_metrics(ps, ys)}
    return results
