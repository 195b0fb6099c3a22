"""Reported statistics against hand-computed cases (stats.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from umbrella_ds.eval import stats


def test_accuracy_and_balanced_accuracy_count_unparseable_as_wrong() -> None:
    labels = ["a", "a", "a", "b"]
    preds = ["a", "a", "b", None]
    assert stats.accuracy(preds, labels) == pytest.approx(2 / 4)
    # recall(a) = 2/3, recall(b) = 0/1 -> (2/3 + 0) / 2
    assert stats.balanced_accuracy(preds, labels) == pytest.approx(1 / 3)
    # Always answering the majority class: accuracy 3/4, balanced accuracy (1 + 0) / 2.
    assert stats.accuracy(["a"] * 4, labels) == pytest.approx(0.75)
    assert stats.balanced_accuracy(["a"] * 4, labels) == pytest.approx(0.5)
    assert stats.accuracy([], []) is None and stats.balanced_accuracy([], []) is None
    with pytest.raises(ValueError, match="3 predictions but 4 labels"):
        stats.accuracy(preds[:3], labels)


def test_auroc_rank_based_with_ties() -> None:
    # Pairs (pos, neg): (0.35, 0.1) win, (0.35, 0.4) loss, (0.8, 0.1) win, (0.8, 0.4) win -> 3/4.
    assert stats.auroc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == pytest.approx(0.75)
    # Ties count one half: pos {0.5, 0.9} vs neg {0.5, 0.5}: 0.5 + 0.5 + 1 + 1 over 4 pairs.
    assert stats.auroc([0.5, 0.5, 0.5, 0.9], [False, True, False, True]) == pytest.approx(0.75)
    assert stats.auroc([0.3] * 4, [True, False, True, False]) == pytest.approx(0.5)
    assert stats.auroc([0.9, 0.1], [False, True]) == pytest.approx(0.0)
    assert stats.auroc([0.2, 0.3], [True, True]) is None  # undefined, not 0.5
    ranks = stats.average_ranks(np.array([3.0, 1.0, 3.0, 2.0]))
    assert ranks.tolist() == [3.5, 1.0, 3.5, 2.0]


def test_auroc_one_vs_rest_binary_equals_binary_and_multiclass_is_macro() -> None:
    p_male = [0.1, 0.4, 0.35, 0.8]
    probs = [{"male": p, "female": 1 - p} for p in p_male]
    labels = ["female", "female", "male", "male"]
    assert stats.auroc_ovr(probs, labels, ["female", "male"]) == pytest.approx(0.75)
    # Three classes, each separated perfectly from the rest except c (one loss of four pairs).
    probs3 = [
        {"a": 0.8, "b": 0.1, "c": 0.1},
        {"a": 0.1, "b": 0.8, "c": 0.1},
        {"a": 0.1, "b": 0.2, "c": 0.7},
        {"a": 0.1, "b": 0.1, "c": 0.05},
    ]
    labels3 = ["a", "b", "c", "c"]
    # a: pos 0.8 vs neg {.1,.1,.1} -> 1; b: pos .8 vs {.1,.2,.1} -> 1;
    # c: pos {.7, .05} vs neg {.1, .1}: .7 wins twice, .05 loses twice -> 2/4.
    assert stats.auroc_ovr(probs3, labels3, ["a", "b", "c"]) == pytest.approx((1 + 1 + 0.5) / 3)
    assert stats.auroc_ovr(probs[:2], labels[:2], ["female", "male"]) is None


def test_mae_and_pearson_skip_unparseable() -> None:
    preds = [1.0, 2.0, None, 3.0]
    targets = [2.0, 4.0, 100.0, 7.0]
    assert stats.mae(preds, targets) == pytest.approx((1 + 2 + 4) / 3)
    # x = 1,2,3; y = 2,4,7: sxy = 5, sxx = 2, syy = 114/9.
    assert stats.pearson_r(preds, targets) == pytest.approx(5 / math.sqrt(2 * 114 / 9))
    assert stats.pearson_r([1.0, 1.0], [2.0, 3.0]) is None  # zero variance
    assert stats.pearson_r([1.0], [2.0]) is None
    assert stats.mae([None], [1.0]) is None


def test_bootstrap_resamples_whole_subjects_with_a_fixed_seed() -> None:
    # Subject A: 9 windows, all right; subject B: 1 window, wrong. Drawing two subjects with
    # replacement gives AA -> 1, AB/BA -> 0.9, BB -> 0: no other value can appear.
    subjects = ["A"] * 9 + ["B"]
    correct = np.array([1.0] * 9 + [0.0])
    seen: set[float] = set()

    def acc(idx: np.ndarray) -> float:
        v = round(float(correct[idx].mean()), 9)
        seen.add(v)
        return v

    ci = stats.bootstrap_ci(subjects, acc, n_boot=400, seed=7)
    assert seen <= {0.0, 0.9, 1.0} and len(seen) == 3
    assert ci is not None and ci[0] == pytest.approx(0.0) and ci[1] == pytest.approx(1.0)
    assert stats.bootstrap_ci(subjects, acc, n_boot=400, seed=7) == ci  # reproducible
    # Undefined in most resamples -> no interval rather than a biased one.
    assert stats.bootstrap_ci(["A", "B"], lambda idx: None, n_boot=50) is None


def test_bootstrap_interval_of_a_perfect_and_a_typical_classifier() -> None:
    subjects = [f"s{i}" for i in range(40)]
    assert stats.bootstrap_ci(subjects, lambda idx: 1.0, n_boot=100) == [1.0, 1.0]
    rng = np.random.default_rng(0)
    hits = (rng.random(40) < 0.75).astype(float)
    lo, hi = stats.bootstrap_ci(subjects, lambda idx: float(hits[idx].mean()), n_boot=500)
    assert lo < hits.mean() < hi and lo > 0.4 and hi < 1.0


def test_per_subject_aggregation_of_windows() -> None:
    assert stats.aggregate_classification(["male", "male", "female"]) == ("male", None)
    assert stats.aggregate_classification([None, None]) == (None, None)
    # Tie in the vote: the higher mean probability wins.
    pred, probs = stats.aggregate_classification(
        ["male", "female"], [{"male": 0.6, "female": 0.4}, {"male": 0.2, "female": 0.8}]
    )
    assert pred == "female" and probs == pytest.approx({"male": 0.4, "female": 0.6})
    assert stats.aggregate_regression([1.0, None, 3.0]) == pytest.approx(2.0)
    assert stats.aggregate_regression([None]) is None


def test_classification_report_per_window_and_per_subject() -> None:
    # Subject s1 (male): windows male, male, female; s2 (female): female, None; s3 (male): female.
    subjects = ["s1", "s1", "s1", "s2", "s2", "s3"]
    labels = ["male", "male", "male", "female", "female", "male"]
    preds = ["male", "male", "female", "female", None, "female"]
    p_male = [0.9, 0.7, 0.4, 0.2, 0.5, 0.45]
    probs = [{"male": p, "female": 1 - p} for p in p_male]
    rep = stats.classification_report(
        preds, labels, subjects, classes=["female", "male"], probs=probs, n_boot=200
    )
    assert rep["accuracy"] == pytest.approx(3 / 6)
    assert rep["unparseable"] == 1 and rep["count"] == 6 and rep["subjects"] == 3
    # recall(male) = 2/4, recall(female) = 1/2
    assert rep["balanced_accuracy"] == pytest.approx(0.5)
    # male scores {.9,.7,.4,.45} vs female {.2,.5}: wins 2+2+1+1 = 6 of 8.
    assert rep["auroc"] == pytest.approx(6 / 8)
    assert set(rep["ci95"]) == {"accuracy", "balanced_accuracy", "auroc"}
    subj = rep["per_subject"]
    # s1 -> male (right), s2 -> female (right), s3 -> female (wrong)
    assert subj["accuracy"] == pytest.approx(2 / 3) and subj["count"] == 3
    assert subj["balanced_accuracy"] == pytest.approx((1 / 2 + 1) / 2)
    # mean p(male): s1 2/3, s2 0.35, s3 0.45 -> male {2/3, .45} vs female {.35}: 2 of 2.
    assert subj["auroc"] == pytest.approx(1.0)


def test_regression_report_and_single_record_subjects_have_no_per_subject_block() -> None:
    rep = stats.regression_report([1.0, 2.0, None, 3.0], [2.0, 4.0, 5.0, 7.0], ["a", "b", "c", "d"])
    assert rep["mae"] == pytest.approx(7 / 3) and rep["unparseable"] == 1
    assert "per_subject" not in rep
    assert rep["ci95"]["mae"][0] <= rep["mae"] <= rep["ci95"]["mae"][1]
    rep = stats.regression_report([1.0, 3.0, 10.0], [2.0, 2.0, 9.0], ["a", "a", "b"], n_boot=50)
    assert rep["per_subject"]["mae"] == pytest.approx((0 + 1) / 2)
    rep = stats.regression_report([1.0, 2.0], [1.0, 2.0], ["a", "a"], n_boot=10)
    assert "different labels [1.0, 2.0]" in rep["per_subject"]["error"]
    assert rep["mae"] == pytest.approx(0.0)  # the record-level numbers are still there
