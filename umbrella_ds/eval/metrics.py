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

Labels (``task_labels``; the rules of issue 24, in this order):

1. Regression is decided from the reference answers first; metadata labels are ignored there
   (the synthetic ``bmi`` task carries a float ``subject_label``).
2. Where every record of a task carries a label in its metadata (``subject_label``, or the field
   ``eval.label_field`` names for the task) and each record's label occurs as a whole word
   (case-insensitive) in its own reference answer, the labels are the classes: the vocabulary is
   the set of labels, not of reference answers. A task whose reference answers are all empty
   (the predecessor's evaluation files) takes its labels too: they are the only truth it has.
3. Otherwise today's rule (class words = distinct reference answers), with a one-line note in the
   log (numeric codes such as 1/2, yes/no answers with a sex label); labels on only some records
   keep today's rule with a warning naming the count.

Reference answers still serve the loss. Tasks whose references are sentences (some reference is
more than its class word) are scored primarily by the likelihood choice (``candidate``,
``umbrella_ds/eval/evaluate.py``); the parsed generation's accuracy is reported beside it.

The statistics themselves (balanced accuracy, AUROC, bootstrap intervals over subjects,
per-subject aggregation of rsfMRI windows) are defined in :mod:`umbrella_ds.eval.stats`.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from umbrella_ds.eval import stats

log = logging.getLogger(__name__)

DEFAULT_LABEL_FIELD = "subject_label"
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


def _word(word: str) -> re.Pattern[str]:
    return re.compile(r"\b" + re.escape(word) + r"\b", re.IGNORECASE)


def has_word(text: str, word: str) -> bool:
    """``word`` occurs in ``text`` as a whole word, case-insensitive."""
    return bool(word) and _word(word).search(text) is not None


def candidate(reference: str, label: str, cls: str) -> str:
    """``reference`` with every whole-word occurrence of ``label`` replaced by ``cls``, each in
    the case it was written (``Male`` -> ``Female``, ``MALE`` -> ``FEMALE``): the answer the
    likelihood choice scores for class ``cls``."""

    def cased(m: re.Match[str]) -> str:
        w = m.group(0)
        if w.isupper() and len(w) > 1:
            return cls.upper()
        if w[:1].isupper():
            return cls[:1].upper() + cls[1:]
        return cls

    return _word(label).sub(cased, reference)


def bare(text: str) -> str:
    """A reference answer trimmed of punctuation and case (``"Female."`` -> ``female``)."""
    return re.sub(r"[^\w\s-]", "", text).strip().lower()


@dataclass(frozen=True)
class TaskLabels:
    """What a task's records are scored against (see the module docstring, "Labels")."""

    kind: Literal["regression", "classification"]
    classes: list[str]
    labels: list[Any]  # per record: the class (classification) or the number (regression)
    source: str  # "metadata.<field>" or "reference"
    sentences: bool  # some reference is more than its class word: likelihood is primary
    note: str | None = None  # why metadata labels were not used (logged once per task)
    warn: bool = False  # the note is a warning (labels on only some records)


def task_labels(
    targets: Sequence[str], meta_labels: Sequence[Any] | None = None, field: str = ""
) -> TaskLabels:
    """The labels of one task's records from their reference answers and metadata labels."""
    field = field or DEFAULT_LABEL_FIELD
    if is_regression(targets):
        return TaskLabels("regression", [], [parse_number(t) for t in targets], "reference", False)
    metas = [
        None if m is None or not str(m).strip() else str(m).strip().lower()
        for m in (meta_labels or [None] * len(targets))
    ]
    n_meta = sum(m is not None for m in metas)
    note, warn = None, False
    if 0 < n_meta < len(targets):
        note = (
            f"{n_meta} of {len(targets)} records carry metadata.{field}: labels not used, "
            "classes from the reference answers"
        )
        warn = True
    elif n_meta:
        labels = [str(m) for m in metas]
        empty = all(not t.strip() for t in targets)
        if empty or all(has_word(t, y) for t, y in zip(targets, labels)):
            sentences = not empty and any(bare(t) != y for t, y in zip(targets, labels))
            return TaskLabels(
                "classification", sorted(set(labels)), labels, f"metadata.{field}", sentences
            )
        t, y = next((t, y) for t, y in zip(targets, labels) if not has_word(t, y))
        note = (
            f"metadata.{field} {y!r} is not a word of the reference answer {t.strip()!r}: "
            "labels not used, classes from the reference answers"
        )
    classes = class_vocabulary(targets)
    return TaskLabels(
        "classification",
        classes,
        [target_label(t, classes) for t in targets],
        "reference",
        False,
        note,
        warn,
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


_NOTED: set[tuple[str, str]] = set()


def note_once(task: str, labels: TaskLabels) -> None:
    """Log why a task's metadata labels were not used, once per task and reason."""
    if labels.note and (task, labels.note) not in _NOTED:
        _NOTED.add((task, labels.note))
        (log.warning if labels.warn else log.info)("task %s: %s", task, labels.note)


def score(
    records: Sequence[dict[str, Any]], *, n_boot: int = stats.N_BOOT, seed: int = stats.SEED
) -> dict[str, dict[str, Any]]:
    """Per-task metrics from prediction records (``task``, ``answer``, ``target``; optional
    ``meta_label`` and ``label_field`` (the record's metadata label and its field),
    ``subject``/``subject_ids``, ``class_probs`` for AUROC and ``choice`` for the likelihood
    choice).

    Adds ``parsed``, ``label`` and ``label_source`` to each record in place, so predictions.jsonl
    shows how each answer was read and what it was scored against. Each task gets its counts,
    point estimates and ``ci95`` (bootstrap over subjects), plus ``per_subject`` when some subject
    has several records (rsfMRI windows, comparisons against several references). For a task
    whose references are sentences and whose records carry a likelihood ``choice``, ``accuracy``
    is the likelihood choice's (``primary: likelihood``) and ``generation_accuracy`` the parsed
    generation's; otherwise ``accuracy`` is the parsed generation's (``primary: generation``).
    """
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_task[r["task"]].append(r)
    results: dict[str, dict[str, Any]] = {}
    for task, recs in sorted(by_task.items()):
        targets = [r["target"] for r in recs]
        fields = {r.get("label_field") for r in recs} - {None}
        tl = task_labels(targets, [r.get("meta_label") for r in recs], next(iter(fields), ""))
        note_once(task, tl)
        # A record without a subject is its own unit of resampling.
        subjects = [subject_of(r) or f"<record {i}>" for i, r in enumerate(recs)]
        if tl.kind == "regression":
            ys = tl.labels
            ps = [parse_number(r["answer"]) for r in recs]
            for r, p, y in zip(recs, ps, ys):
                r["parsed"], r["label"], r["label_source"] = p, y, tl.source
            report = stats.regression_report(ps, ys, subjects, n_boot=n_boot, seed=seed)
            results[task] = {"kind": "regression", **report}
            continue
        classes, ys = tl.classes, tl.labels
        parsed = [parse_class(r["answer"], classes) for r in recs]
        for r, p, y in zip(recs, parsed, ys):
            r["parsed"], r["label"], r["label_source"] = p, y, tl.source
        likelihood = tl.sentences and all(r.get("choice") in classes for r in recs)
        preds = [r["choice"] for r in recs] if likelihood else parsed
        probs = [r.get("class_probs") for r in recs]
        usable = all(p is not None and set(p) >= set(classes) for p in probs)
        report = stats.classification_report(
            preds,
            ys,
            subjects,
            classes=classes,
            probs=probs if usable else None,
            n_boot=n_boot,
            seed=seed,
        )
        methods = {r.get("method") for r in recs} - {None}
        extra: dict[str, Any] = {
            "primary": "likelihood" if likelihood else "generation",
            "method": next(iter(methods)) if len(methods) == 1 else None,
            "label_source": tl.source,
        }
        if likelihood:
            extra["generation_accuracy"] = stats.accuracy(parsed, ys)
            extra["generation_balanced_accuracy"] = stats.balanced_accuracy(parsed, ys)
            extra["generation_unparseable"] = sum(p is None for p in parsed)
        results[task] = {"kind": "classification", **report, **extra}
    return results
