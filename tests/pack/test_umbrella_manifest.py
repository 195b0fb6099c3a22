"""``umbrella-pack manifest --instructions``: the predecessor's instruction files (cluster paths,
JSONL / JSON folders, sMRI + fMRI frame folders) -> the manifest ``build`` packs."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from helpers.umbrella_forms import CLUSTER_FMRI, CLUSTER_T1, write_umbrella_forms

from data_prep.cli import main as pack_main
from data_prep.umbrella_manifest import PathMap, rewrite, scan
from umbrella_ds.errors import UserError


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
    return write_umbrella_forms(tmp_path_factory.mktemp("forms"), subjects=12)


def _all_files(forms) -> list[str]:
    return [str(p) for split in ("train", "test") for p in forms.files(split)]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_every_subject_and_modality_with_phenotypes(forms, tmp_path):
    out = tmp_path / "m.csv"
    argv = ["manifest", "--instructions", *_all_files(forms), "--phenotypes", str(forms.phenotypes)]
    for pm in forms.path_maps:
        argv += ["--path-map", pm]
    assert pack_main([*argv, "--out", str(out)]) == 0
    rows = _rows(out)
    assert list(rows[0]) == ["subject_id", "T1", "rsfMRI", "sex", "age", "BMI_sds"]
    keys = [r["subject_id"] for r in rows]
    assert keys == sorted(forms.labels)  # every subject, sorted by key
    for r in rows:
        assert r["T1"] == str(forms.t1_dir / f"{r['subject_id']}.nii.gz")
        assert r["rsfMRI"] == str(forms.frames_dir / r["subject_id"])
        assert {"1": "male", "2": "female"}[r["sex"]] == forms.labels[r["subject_id"]]
    assert _rows(tmp_path / "m.missing.csv") == []


def test_rows_do_not_depend_on_the_order_of_the_files(forms, tmp_path):
    files = _all_files(forms)
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    maps = [x for pm in forms.path_maps for x in ("--path-map", pm)]
    assert pack_main(["manifest", "--instructions", *files, *maps, "--out", str(a)]) == 0
    assert pack_main(["manifest", "--instructions", *files[::-1], *maps, "--out", str(b)]) == 0
    assert a.read_bytes() == b.read_bytes()


def test_missing_images_are_listed_with_path_and_reason(forms, tmp_path):
    t1_only = tmp_path / "t1"
    shutil.copytree(forms.t1_dir, t1_only)
    gone = sorted(forms.labels)[0]
    (t1_only / f"{gone}.nii.gz").unlink()
    files = [str(forms.instructions[n]["train"]) for n in ("sex_classification", "rsfmri_sex")]
    files += [str(forms.instructions[n]["test"]) for n in ("sex_classification", "rsfmri_sex")]
    # Only the T1 prefix is mapped: every frame folder stays a cluster path that does not exist.
    found = scan(files, path_maps=[f"{CLUSTER_T1}={t1_only}"])
    rows = {r["subject_id"]: r for r in found.rows}
    assert gone not in rows  # none of its images exists: no row
    assert all(r["T1"] and not r["rsfMRI"] for r in rows.values())
    missing = {(m["subject_id"], m["modality"]): m for m in found.missing}
    assert missing[(gone, "T1")]["reason"] == "missing file"
    assert missing[(gone, "T1")]["path"] == str(t1_only / f"{gone}.nii.gz")
    rs = missing[(sorted(rows)[0], "rsfMRI")]
    assert rs["path"].startswith(CLUSTER_FMRI) and rs["reason"] == "missing file"
    assert len(missing) == len(forms.labels) + 1


def test_frame_folder_without_frames_is_missing(forms, tmp_path):
    frames = tmp_path / "img"
    shutil.copytree(forms.frames_dir, frames)
    key = sorted(forms.labels)[1]
    for p in (frames / key).glob("frame_*.pt"):
        p.unlink()
    found = scan(
        [forms.instructions["rsfmri_sex"]["train"], forms.instructions["rsfmri_sex"]["test"]],
        path_maps=[f"{CLUSTER_FMRI}={frames}"],
    )
    assert [(m["subject_id"], m["reason"]) for m in found.missing] == [
        (key, "empty image: no frame_0.pt in the frame folder")
    ]


def test_two_paths_for_one_subject_are_refused(forms, tmp_path):
    rec = json.loads(forms.instructions["sex_classification"]["train"].read_text().splitlines()[0])
    other = json.loads(json.dumps(rec).replace(CLUSTER_T1, "/elsewhere/t1"))
    f = tmp_path / "two.jsonl"
    f.write_text(json.dumps(rec) + "\n" + json.dumps(other) + "\n")
    with pytest.raises(UserError, match=rf"two.jsonl:2: subject {rec['subject_ids'][0]} T1"):
        scan([f])
    assert pack_main(["manifest", "--instructions", str(f), "--out", str(tmp_path / "m.csv")]) == 2
    assert not (tmp_path / "m.csv").exists()


def test_relative_paths_resolve_against_the_instruction_file(forms, tmp_path):
    key = sorted(forms.labels)[0]
    (tmp_path / "imgs").mkdir()
    shutil.copy(forms.t1_dir / f"{key}.nii.gz", tmp_path / "imgs")
    rec = json.loads(forms.instructions["sex_classification"]["train"].read_text().splitlines()[0])
    rec = json.loads(
        json.dumps(rec).replace(f"{CLUSTER_T1}/{rec['subject_ids'][0]}", f"imgs/{key}")
    )
    rec["subject_ids"] = [key]
    (tmp_path / "sub").mkdir()
    f = tmp_path / "sub" / "rel.json"
    f.write_text(json.dumps([rec]))
    (tmp_path / "sub" / "imgs").symlink_to(tmp_path / "imgs")
    assert scan([f]).rows == [
        {"subject_id": key, "T1": str(tmp_path / "sub" / "imgs" / f"{key}.nii.gz")}
    ]


def test_path_map_matches_whole_components_longest_first():
    maps = [PathMap.parse("/a/b=/x"), PathMap.parse("/a/b/c/=/y")]
    assert rewrite("/a/b/c/s.nii.gz", maps) == "/y/s.nii.gz"
    assert rewrite("/a/b/d/s.nii.gz", maps) == "/x/d/s.nii.gz"
    assert rewrite("/a/bc/s.nii.gz", maps) == "/a/bc/s.nii.gz"
    with pytest.raises(UserError, match="expected OLD=NEW"):
        PathMap.parse("/a/b")


def test_phenotype_key_and_flag_mixups_are_usage_errors(forms, tmp_path):
    f = str(forms.instructions["sex_classification"]["train"])
    bad = tmp_path / "p.csv"
    bad.write_text("id,sex\nX,1\n")
    out = str(tmp_path / "m.csv")
    base = ["manifest", "--out", out]
    assert pack_main([*base, "--instructions", f, "--phenotypes", str(bad)]) == 2
    assert pack_main([*base, "--instructions", f, "--session", "x"]) == 2
    assert pack_main([*base, "--bids", str(tmp_path), "--path-map", "/a=/b"]) == 2
    assert pack_main([*base, "--instructions", str(tmp_path / "nope.jsonl")]) == 2
