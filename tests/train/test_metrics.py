"""The answer parser and per-task metrics (documented in umbrella_ds/eval/metrics.py)."""

from __future__ import annotations

import pytest

from umbrella_ds.eval.metrics import (
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


# ---------------------------------------------------------------- labels (issue 24)
# Answer forms of the predecessor's sample files (Transconnectome/BrainVLM UMBRELLA/sample_data
# and UMBRELLA_gemini/sample_data), written here in their style, with the class they name.
PREDECESSOR_FORMS = [
    ("female.", "female"),
    ("male.", "male"),
    ("", None),  # evaluation files: the answer left empty, the truth in metadata.subject_label
    (
        "This scan likely belongs to a female subject. Unlike the reference male scan, this "
        "shows structural characteristics typical of female neuroanatomy.",
        "female",
    ),
    (
        "This scan likely belongs to a male subject. Key features align with the reference male "
        "scan in terms of overall brain volume and regional proportions.",
        "male",
    ),
    ("Classification: Male. Compared to the female reference, this scan shows ...", "male"),
    ("Classification: Female. The structural features show consistency with ...", "female"),
    (
        "Based on comparison with the reference scan, this appears to be a male subject. "
        "Structural similarities include comparable gray matter volumes.",
        "male",
    ),
]
# Names the reference first: a first-match parse reads the reference's class (why sentence
# tasks are scored by the likelihood choice).
REFERENCE_FIRST = (
    "Based on comparison with the male reference scan, this appears to be a female subject.",
    "female",
)


@pytest.mark.parametrize(("answer", "label"), PREDECESSOR_FORMS)
def test_parser_on_every_predecessor_answer_form(answer, label):
    assert parse_class(answer, SEX) == label


def test_a_first_match_parse_misreads_an_answer_naming_the_reference_first():
    answer, truth = REFERENCE_FIRST
    assert parse_class(answer, SEX) == "male" != truth


def _labels(targets, metas, field=""):
    from umbrella_ds.eval.metrics import task_labels

    return task_labels(targets, metas, field)


def test_labels_from_metadata_make_the_classes_of_sentence_answers():
    forms = [a for a, y in PREDECESSOR_FORMS if y] + [REFERENCE_FIRST[0]]
    truth = [y for _, y in PREDECESSOR_FORMS if y] + [REFERENCE_FIRST[1]]
    tl = _labels(forms, truth)
    assert tl.kind == "classification" and tl.classes == ["female", "male"]
    assert tl.labels == truth and tl.source == "metadata.subject_label"
    assert tl.sentences and tl.note is None


def test_short_answers_with_labels_are_not_sentences():
    tl = _labels(["female.", "Male", "male."], ["female", "male", "Male"])
    assert tl.source == "metadata.subject_label" and not tl.sentences
    assert tl.labels == ["female", "male", "male"]


def test_regression_is_decided_from_the_references_first():
    tl = _labels(["0.3", "-1.2"], [0.3, -1.2])  # the synthetic bmi task's float subject_label
    assert tl.kind == "regression" and tl.labels == [0.3, -1.2] and tl.source == "reference"


@pytest.mark.parametrize(
    ("targets", "metas"),
    [
        (["1", "2", "a"], ["male", "female", "male"]),  # codes: the label is not in the answer
        (["yes.", "no."], ["female", "male"]),  # the project's own T3 data: same-sex yes/no
    ],
)
def test_labels_absent_from_the_answers_keep_todays_rule_with_a_note(targets, metas):
    tl = _labels(targets, metas)
    assert tl.source == "reference" and not tl.warn
    assert "is not a word of the reference answer" in tl.note
    assert tl.classes == class_vocabulary(targets)


def test_labels_on_some_records_keep_todays_rule_with_a_warning_naming_the_count():
    tl = _labels(["female.", "male.", "male."], ["female", None, ""])
    assert tl.source == "reference" and tl.warn
    assert tl.note.startswith("1 of 3 records carry metadata.subject_label")


def test_a_configured_label_field_is_named_in_the_source():
    tl = _labels(["female.", "male."], ["female", "male"], "sex")
    assert tl.source == "metadata.sex"


def test_empty_references_take_their_labels():
    tl = _labels(["", ""], ["female", "male"])
    assert tl.source == "metadata.subject_label" and not tl.sentences


def test_candidate_replaces_every_occurrence_of_the_label_in_its_case():
    from umbrella_ds.eval.metrics import candidate

    ref = "Classification: Male. Unlike the female reference, typical of male anatomy."
    assert candidate(ref, "male", "female") == (
        "Classification: Female. Unlike the female reference, typical of female anatomy."
    )
    assert candidate("MALE.", "male", "female") == "FEMALE."


def test_score_aggregates_comparison_records_per_subject_by_their_label():
    """Two comparisons of one subject with different sentences agree on the subject's label."""
    recs = [
        {"task": "cmp", "answer": "x", "target": PREDECESSOR_FORMS[3][0], "meta_label": "female",
         "label_field": "subject_label", "subject": "S1", "choice": "female",
         "class_probs": {"female": 0.9, "male": 0.1}},
        {"task": "cmp", "answer": "female", "target": REFERENCE_FIRST[0], "meta_label": "female",
         "label_field": "subject_label", "subject": "S1", "choice": "male",
         "class_probs": {"female": 0.4, "male": 0.6}},
        {"task": "cmp", "answer": "female", "target": PREDECESSOR_FORMS[4][0], "meta_label": "male",
         "label_field": "subject_label", "subject": "S2", "choice": "male",
         "class_probs": {"female": 0.2, "male": 0.8}},
    ]  # fmt: skip
    m = score(recs, n_boot=10)["cmp"]
    assert m["primary"] == "likelihood" and m["accuracy"] == pytest.approx(2 / 3)
    assert m["generation_accuracy"] == pytest.approx(1 / 3)  # "x" is unparseable, S2 wrong
    assert "error" not in m["per_subject"] and m["per_subject"]["subjects"] == 2
    assert [r["label_source"] for r in recs] == ["metadata.subject_label"] * 3
    assert [r["parsed"] for r in recs] == [None, "female", "female"]
