"""Readers of the predecessor's instruction formats and subject resolution."""

from __future__ import annotations

import json

import pytest
from helpers.data import SUBJECT_A, SUBJECT_B, t1_task, t3_task, write_jsonl

from umbrella_ds.data import (
    ImageRef,
    InstructionError,
    MissingSubjectError,
    load_instructions,
    resolve_subjects,
    subject_from_path,
)


def test_jsonl_t1_and_t3(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [t1_task(), t3_task()])
    t1, t3 = load_instructions(path)
    assert t1.task_id == f"t1_sex_{SUBJECT_A}" and t1.task_type == "T1"
    assert t1.images == (ImageRef(SUBJECT_A, "T1"),)
    assert [t.role for t in t1.turns] == ["user", "assistant"]
    assert t1.turns[0].parts[0] == ImageRef(SUBJECT_A, "T1")
    assert t1.turns[0].text == "<image>\nWhat is the sex of this subject?"
    assert t1.metadata["subject_label"] == "female"
    assert t1.source == f"{path}:1" and t3.source == f"{path}:2"
    assert t3.images == (ImageRef(SUBJECT_A, "T1"), ImageRef(SUBJECT_B, "T1"))
    # The query image stays between its texts.
    assert t3.turns[2].text == "Now this one:\n<image>\nSame sex?"
    assert t3.turns[2].parts[2] == ImageRef(SUBJECT_B, "T1")


def test_json_array_and_folder_give_the_same_tasks(tmp_path):
    records = [t1_task(), t3_task()]
    (tmp_path / "arr.json").write_text(json.dumps(records))
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, r in enumerate(records):
        (folder / f"{i:02d}.json").write_text(json.dumps(r, indent=2))
    from_jsonl = load_instructions(write_jsonl(tmp_path / "x.jsonl", records))
    from_array = load_instructions(tmp_path / "arr.json")
    from_folder = load_instructions(folder)
    key = [(t.task_id, t.images, t.turns) for t in from_jsonl]
    assert [(t.task_id, t.images, t.turns) for t in from_array] == key
    assert [(t.task_id, t.images, t.turns) for t in from_folder] == key
    assert from_array[1].source == f"{tmp_path / 'arr.json'}[1]"


def test_legacy_form(tmp_path):
    legacy = {
        "subject_id": SUBJECT_A,
        "modality_paths": {"fMRI": f"/abcd/img/{SUBJECT_A}/"},
        "conversations": [
            {"from": "human", "value": "Look: <image>\nSex?"},
            {"from": "gpt", "value": "male."},
        ],
    }
    (task,) = load_instructions(write_jsonl(tmp_path / "old.jsonl", [legacy]))
    assert task.images == (ImageRef(SUBJECT_A, "rsfMRI"),)
    assert task.turns[0].parts == ("Look: ", ImageRef(SUBJECT_A, "rsfMRI"), "\nSex?")
    assert [t.role for t in task.turns] == ["user", "assistant"]


@pytest.mark.parametrize(
    ("path", "subject"),
    [
        ("/x/T1/NDARINV007W6H7B.nii.gz", "NDARINV007W6H7B"),
        ("rel/NDARINV007W6H7B.nii", "NDARINV007W6H7B"),
        ("/abcd/img/NDARINV007W6H7B/", "NDARINV007W6H7B"),
        ("/abcd/img/NDARINV007W6H7B", "NDARINV007W6H7B"),
    ],
)
def test_subject_from_path(path, subject):
    assert subject_from_path(path) == subject


def test_subject_from_path_when_no_ids(tmp_path):
    rec = t1_task()
    del rec["subject_ids"], rec["metadata"]["subject_id"]
    (task,) = load_instructions(write_jsonl(tmp_path / "x.jsonl", [rec]))
    assert task.images[0].subject_id == SUBJECT_A


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(t1_task()) + "\n" + '{"task_id": "x", oops\n')
    with pytest.raises(InstructionError, match=rf"{path}:2: malformed JSON"):
        load_instructions(path)


def test_unknown_modality_names_file_and_line(tmp_path):
    rec = t1_task()
    rec["images"][0]["modality"] = rec["conversations"][0]["content"][0]["modality"] = "DWI"
    path = write_jsonl(tmp_path / "x.jsonl", [t1_task("S2"), rec])
    with pytest.raises(InstructionError, match=rf"{path}:2: .*unknown modality 'DWI'"):
        load_instructions(path)


def test_image_count_mismatch_names_task(tmp_path):
    legacy = {
        "task_id": "old-7",
        "subject_id": SUBJECT_A,
        "modality_paths": {"sMRI": f"{SUBJECT_A}.nii.gz"},
        "conversations": [
            {"from": "human", "value": "<image> and <image>?"},
            {"from": "gpt", "value": "male."},
        ],
    }
    with pytest.raises(InstructionError, match=r"task 'old-7': 2 image placeholder\(s\).*1 image"):
        load_instructions(write_jsonl(tmp_path / "x.jsonl", [legacy]))


def test_unknown_role_is_an_error(tmp_path):
    rec = t1_task()
    rec["conversations"][1]["role"] = "bot"
    with pytest.raises(InstructionError, match=r":1: task .*unknown role 'bot'"):
        load_instructions(write_jsonl(tmp_path / "x.jsonl", [rec]))


def test_missing_subject_error_lists_task_ids_or_counts_skip(tmp_path):
    tasks = load_instructions(
        write_jsonl(
            tmp_path / "x.jsonl", [t1_task(), t1_task("NDARGONE"), t3_task(SUBJECT_A, "NDARGONE")]
        )
    )
    with pytest.raises(MissingSubjectError, match=r"2 task\(s\).*t1_sex_NDARGONE.*t3_"):
        resolve_subjects(tasks, {SUBJECT_A}, "error")
    kept, skipped = resolve_subjects(tasks, {SUBJECT_A}, "skip")
    assert [t.task_id for t in kept] == [f"t1_sex_{SUBJECT_A}"] and skipped == 2
    # With a has() check a subject lacking the modality counts as missing too.
    kept, skipped = resolve_subjects(
        tasks, {SUBJECT_A, "NDARGONE"}, "skip", has=lambda s, m: s == SUBJECT_A
    )
    assert skipped == 2
