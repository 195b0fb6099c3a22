"""Statistics a paper reports, computed the same way by in-training evaluation and ``umbrella-eval``.

Definitions (each function's docstring repeats its own):

- accuracy: correct / all; an unparseable answer (``None``) is wrong, never dropped.
- balanced accuracy: mean over the classes present among the labels of that class's recall.
- AUROC: rank-based (Mann-Whitney U / (n_pos * n_neg)) with average ranks for tied scores, so a
  tie between a positive and a negative counts one half. Multi-class: the macro mean of
  one-vs-rest AUROCs over the classes present (for two classes both one-vs-rest values are equal
  when the two probabilities sum to one, so it is the usual binary AUROC). None when a class is
  missing (undefined, not 0.5).
- MAE and Pearson r over the answers that parsed as numbers (an unparseable answer has no number
  to score; it is counted separately). Pearson r is None for fewer than two pairs or zero variance.
- Per subject: several records of one subject (rsfMRI windows, several T3 references for one query)
  are first aggregated: classification by majority vote of the answers scored (parsed answers, or
  the likelihood choices where those are primary; ties broken by the higher mean probability, then
  alphabetically; no answer -> unparseable) with class probabilities averaged; regression by the
  mean of the parsed numbers. The subject's label is its records' label, which metrics.score takes
  from metadata where the task has labels there, so comparison records of one subject whose
  reference sentences differ still agree; records that disagree about it are not aggregated.
- 95% bootstrap interval over subjects: subjects are resampled with replacement (a fixed seed, so
  the interval is reproducible) and every record of a drawn subject comes along (a cluster
  bootstrap; with one record per subject it is the ordinary bootstrap). Percentile interval; a
  resample where the statistic is undefined is skipped, and the interval is None when more than
  half are.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

N_BOOT = 1000
SEED = 0
LEVEL = 0.95


# ---------------------------------------------------------------- point estimates


def accuracy(preds: Sequence[Any], labels: Sequence[Any]) -> float | None:
    """Fraction of ``preds`` equal to ``labels`` (None counts as wrong); None for no records."""
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions but {len(labels)} labels")
    if not labels:
        return None
    return sum(p is not None and p == y for p, y in zip(preds, labels)) / len(labels)


def balanced_accuracy(preds: Sequence[Any], labels: Sequence[Any]) -> float | None:
    """Mean per-class recall over the classes present among ``labels`` (None counts as wrong)."""
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions but {len(labels)} labels")
    hits: dict[Any, list[int]] = defaultdict(lambda: [0, 0])
    for p, y in zip(preds, labels):
        hits[y][0] += p is not None and p == y
        hits[y][1] += 1
    if not hits:
        return None
    return sum(h / n for h, n in hits.values()) / len(hits)


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, tied values sharing the mean of their ranks."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(xs)]
    ranks_sorted = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    ranks = np.empty_like(ranks_sorted)
    ranks[order] = ranks_sorted
    return ranks


def auroc(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """Rank-based AUROC of ``scores`` for the ``positive`` flags; None if a class is absent."""
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positive, dtype=bool)
    if s.shape != pos.shape:
        raise ValueError(f"{s.size} scores but {pos.size} labels")
    if not np.isfinite(s).all():
        raise ValueError("AUROC needs finite scores")
    n_pos = int(pos.sum())
    n_neg = pos.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    r = average_ranks(s)
    u = r[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def auroc_ovr(
    probs: Sequence[Mapping[str, float]], labels: Sequence[str], classes: Sequence[str]
) -> float | None:
    """Macro one-vs-rest AUROC over the ``classes`` present among ``labels``.

    ``probs[i][c]`` is the model's probability (or any score) of class ``c`` for record ``i``.
    None when fewer than two classes are present.
    """
    present = [c for c in classes if c in set(labels)]
    if len(present) < 2:
        return None
    values = []
    for c in present:
        a = auroc([p[c] for p in probs], [y == c for y in labels])
        if a is not None:
            values.append(a)
    return float(np.mean(values)) if values else None


def mae(preds: Sequence[float | None], targets: Sequence[float]) -> float | None:
    """Mean absolute error over the pairs whose prediction parsed; None if none did."""
    pairs = [(p, y) for p, y in zip(preds, targets) if p is not None]
    if not pairs:
        return None
    return float(np.mean([abs(p - y) for p, y in pairs]))


def pearson_r(preds: Sequence[float | None], targets: Sequence[float]) -> float | None:
    """Pearson correlation over the parsed pairs; None for < 2 pairs or zero variance."""
    pairs = np.array([(p, y) for p, y in zip(preds, targets) if p is not None], dtype=np.float64)
    if len(pairs) < 2:
        return None
    x, y = pairs[:, 0] - pairs[:, 0].mean(), pairs[:, 1] - pairs[:, 1].mean()
    sxx, syy = float(x @ x), float(y @ y)
    if sxx <= 0 or syy <= 0:
        return None
    return float((x @ y) / np.sqrt(sxx * syy))


# ---------------------------------------------------------------- subjects and intervals


def bootstrap_ci(
    subjects: Sequence[str],
    statistic: Callable[[np.ndarray], float | None],
    *,
    n_boot: int = N_BOOT,
    seed: int = SEED,
    level: float = LEVEL,
) -> list[float] | None:
    """Percentile interval of ``statistic`` over resamples of subjects (cluster bootstrap).

    ``subjects[i]`` is the subject of record ``i``; ``statistic(idx)`` evaluates the metric on the
    records ``idx`` (an index array, with repeats). Returns ``[low, high]`` or None.
    """
    if n_boot < 1:
        return None
    by_subject: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(subjects):
        by_subject[s].append(i)
    groups = [np.asarray(v, dtype=np.int64) for _, v in sorted(by_subject.items())]
    if not groups:
        return None
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        drawn = rng.integers(0, len(groups), size=len(groups))
        v = statistic(np.concatenate([groups[g] for g in drawn]))
        if v is not None and np.isfinite(v):
            values.append(v)
    if len(values) * 2 < n_boot:
        return None
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(np.asarray(values), [alpha, 1.0 - alpha])
    return [float(lo), float(hi)]


def aggregate_classification(
    preds: Sequence[str | None], probs: Sequence[Mapping[str, float]] | None = None
) -> tuple[str | None, dict[str, float] | None]:
    """One subject's records -> (majority answer, mean class probabilities).

    Ties in the vote go to the higher mean probability, then to the alphabetically first class;
    no parsed answer -> None (unparseable).
    """
    mean_probs = None
    if probs:
        keys = sorted(probs[0])
        mean_probs = {k: float(np.mean([p[k] for p in probs])) for k in keys}
    votes = Counter(p for p in preds if p is not None)
    if not votes:
        return None, mean_probs
    top = max(votes.values())
    tied = sorted(c for c, n in votes.items() if n == top)
    if len(tied) > 1 and mean_probs is not None:
        tied.sort(key=lambda c: -mean_probs.get(c, float("-inf")))
    return tied[0], mean_probs


def aggregate_regression(preds: Sequence[float | None]) -> float | None:
    """One subject's records -> mean of the parsed numbers (None if none parsed)."""
    values = [p for p in preds if p is not None]
    return float(np.mean(values)) if values else None


def group_by_subject(subjects: Sequence[str]) -> dict[str, list[int]]:
    """Record indices per subject, subjects in sorted order."""
    out: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(subjects):
        out[s].append(i)
    return dict(sorted(out.items()))


# ---------------------------------------------------------------- task reports


def classification_report(
    preds: Sequence[str | None],
    labels: Sequence[str],
    subjects: Sequence[str],
    *,
    classes: Sequence[str],
    probs: Sequence[Mapping[str, float]] | None = None,
    n_boot: int = N_BOOT,
    seed: int = SEED,
) -> dict[str, Any]:
    """accuracy, balanced accuracy, AUROC (when ``probs``), counts, 95% CIs over subjects.

    ``per_subject`` holds the same after aggregating each subject's records; it is added when
    some subject has more than one record (rsfMRI windows). A subject whose records disagree
    about its label cannot be aggregated: ``per_subject`` then holds only ``error`` saying so.
    """
    out = _classification_level(preds, labels, subjects, classes, probs, n_boot, seed)
    groups = group_by_subject(subjects)
    if any(len(v) > 1 for v in groups.values()):
        conflict = _conflict(groups, labels)
        if conflict:
            out["per_subject"] = {"error": conflict}
            return out
        s_preds, s_labels, s_probs = [], [], []
        for idx in groups.values():
            p, pr = aggregate_classification(
                [preds[i] for i in idx], [probs[i] for i in idx] if probs is not None else None
            )
            s_preds.append(p)
            s_labels.append(labels[idx[0]])
            s_probs.append(pr)
        out["per_subject"] = _classification_level(
            s_preds,
            s_labels,
            list(groups),
            classes,
            s_probs if probs is not None else None,
            n_boot,
            seed,
        )
    return out


def _conflict(groups: dict[str, list[int]], labels: Sequence[Any]) -> str | None:
    """Why per-subject aggregation is impossible (a subject with several labels), or None."""
    for subject, idx in groups.items():
        found = {labels[i] for i in idx}
        if len(found) > 1:
            return (
                f"subject {subject!r} has records with different labels {sorted(found)}: "
                "not aggregated per subject"
            )
    return None


def _classification_level(preds, labels, subjects, classes, probs, n_boot, seed) -> dict[str, Any]:
    preds, labels = list(preds), list(labels)

    def acc(idx: np.ndarray) -> float | None:
        return accuracy([preds[i] for i in idx], [labels[i] for i in idx])

    def bacc(idx: np.ndarray) -> float | None:
        return balanced_accuracy([preds[i] for i in idx], [labels[i] for i in idx])

    def auc(idx: np.ndarray) -> float | None:
        return auroc_ovr([probs[i] for i in idx], [labels[i] for i in idx], classes)

    everything = np.arange(len(labels))
    out: dict[str, Any] = {
        "accuracy": acc(everything),
        "balanced_accuracy": bacc(everything),
        "auroc": auc(everything) if probs is not None else None,
        "count": len(labels),
        "subjects": len(set(subjects)),
        "unparseable": sum(p is None for p in preds),
    }
    ci = {"accuracy": bootstrap_ci(subjects, acc, n_boot=n_boot, seed=seed)}
    ci["balanced_accuracy"] = bootstrap_ci(subjects, bacc, n_boot=n_boot, seed=seed)
    if probs is not None:
        ci["auroc"] = bootstrap_ci(subjects, auc, n_boot=n_boot, seed=seed)
    out["ci95"] = ci
    return out


def regression_report(
    preds: Sequence[float | None],
    targets: Sequence[float],
    subjects: Sequence[str],
    *,
    n_boot: int = N_BOOT,
    seed: int = SEED,
) -> dict[str, Any]:
    """MAE, Pearson r, counts and 95% CIs over subjects (+ ``per_subject`` as above)."""
    out = _regression_level(preds, targets, subjects, n_boot, seed)
    groups = group_by_subject(subjects)
    if any(len(v) > 1 for v in groups.values()):
        conflict = _conflict(groups, targets)
        if conflict:
            out["per_subject"] = {"error": conflict}
            return out
        s_preds, s_targets = [], []
        for idx in groups.values():
            s_preds.append(aggregate_regression([preds[i] for i in idx]))
            s_targets.append(targets[idx[0]])
        out["per_subject"] = _regression_level(s_preds, s_targets, list(groups), n_boot, seed)
    return out


def _regression_level(preds, targets, subjects, n_boot, seed) -> dict[str, Any]:
    preds, targets = list(preds), list(targets)

    def m(idx: np.ndarray) -> float | None:
        return mae([preds[i] for i in idx], [targets[i] for i in idx])

    def r(idx: np.ndarray) -> float | None:
        return pearson_r([preds[i] for i in idx], [targets[i] for i in idx])

    everything = np.arange(len(targets))
    return {
        "mae": m(everything),
        "pearson_r": r(everything),
        "count": len(targets),
        "subjects": len(set(subjects)),
        "unparseable": sum(p is None for p in preds),
        "ci95": {
            "mae": bootstrap_ci(subjects, m, n_boot=n_boot, seed=seed),
            "pearson_r": bootstrap_ci(subjects, r, n_boot=n_boot, seed=seed),
        },
    }
