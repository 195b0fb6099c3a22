"""The answer parser and per-task metrics (documented in umbrella_ds/train/metrics.py)."""

from __future__ import annotations

import pytest

from umbrella_ds.train.metrics import (
    class_vocabulary,
    classification_metrics,
    is_regression,
    parse_class,
    parse_number,
    regression_metrics,
    score,
)

SEX = ["female", "male"]


@pytest.mark.parametrize(
    ("answer", "label"),
    [
        ("female.", "female"),
        ("Male", "male"),
        ("The subject is FEMALE.", "female"),
        ("male, not female", "male"),  # the first class word wins
        ("female male", "female"),
        ("females", None),  # whole words only
        ("femalemale", None),
        ("", None),
        ("I cannot tell", None),
    ],
)
def test_parse_class(answer, label):
    assert parse_class(answer, SEX) == label


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("23.5", 23.5),
        ("about -1.2 sds", -1.2),
        ("1e3 months", 1000.0),
        ("BMI .5", 0.5),
        ("none", None),
    ],
)
def test_parse_number(text, value):
    assert parse_number(text) == value


def test_task_kind_and_vocabulary():
    assert is_regression(["1.5", "-0.3", "12"])
    assert not is_regression(["male.", "female."])
    assert class_vocabulary(["male.", "Female.", "male"]) == ["female", "male"]


def test_classification_counts_unparseable_as_wrong():
    m = classification_metrics(
        ["male", None, "female", "female"], ["male", "male", "female", "male"]
    )
    assert m["accuracy"] == 0.5
    assert m["balanced_accuracy"] == pytest.approx((1 / 3 + 1) / 2)
    assert m["unparseable"] == 1 and m["count"] == 4


def test_regression_metrics():
    m = regression_metrics([1.0, 2.0, None, 4.0], [1.0, 3.0, 5.0, 5.0])
    assert m["mae"] == pytest.approx(2 / 3)
    assert m["unparseable"] == 1 and m["count"] == 4
    assert m["pearson_r"] == pytest.approx(0.9819805, rel=1e-6)
    assert regression_metrics([1.0], [2.0])["pearson_r"] is None


def test_score_groups_tasks_and_annotates_records():
    recs = [
        {"task": "sex", "answer": "female.", "target": "female."},
        {"task": "sex", "answer": "gibberish", "target": "male."},
        {"task": "bmi", "answer": "1.0", "target": "1.5"},
        {"task": "bmi", "answer": "2.0", "target": "2.0"},
    ]
    out = score(recs)
    assert out["sex"]["kind"] == "classification" and out["sex"]["accuracy"] == 0.5
    assert out["sex"]["unparseable"] == 1
    assert out["bmi"]["kind"] == "regression" and out["bmi"]["mae"] == pytest.approx(0.25)
    assert recs[1]["parsed"] is None and recs[1]["label"] == "male"
