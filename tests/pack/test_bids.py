"""``umbrella-pack manifest --bids``: a BIDS tree the test writes (sessions, several runs, a
subject without BOLD, an fMRIPrep-style derivative) -> the manifest ``build`` packs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_prep import bids
from data_prep.cli import main as pack_main
from umbrella_ds.errors import UserError

A, B, C, D = "NDARINVAAAAAAAA", "NDARINVBBBBBBBB", "NDARINVCCCCCCCC", "NDARINVDDDDDDDD"


def _nifti(path: Path, shape: tuple[int, ...], seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).normal(100, 10, shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))


def _touch(path: Path, *_shape_and_seed) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def write_tree(root: Path, images=_touch) -> Path:
    """A: two sessions, two T1w runs and two rest runs in each (plus a task-nback BOLD);
    B: no sessions, run-less files; C: T1w only; D: only in participants.tsv."""
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "t", "BIDSVersion": "1.9.0"})
    )
    (root / "participants.tsv").write_text(
        "participant_id\tsex\tage\n"
        f"sub-{A}\tM\t10.5\nsub-{B}\tF\tn/a\nsub-{C}\tF\t9\nsub-{D}\tM\t11\n"
    )
    t1_shape, bold_shape = (12, 12, 12), (8, 8, 8, 6)
    for k, ses in enumerate(("2YearFollowUpYArm1", "baselineYear1Arm1")):
        s = root / f"sub-{A}" / f"ses-{ses}"
        for run in (2, 1):
            images(
                s / "anat" / f"sub-{A}_ses-{ses}_run-{run:02d}_T1w.nii.gz", t1_shape, 10 * k + run
            )
            images(s / "func" / f"sub-{A}_ses-{ses}_task-rest_run-{run}_bold.nii.gz", bold_shape, 20 * k + run)  # fmt: skip
            (s / "func" / f"sub-{A}_ses-{ses}_task-rest_run-{run}_bold.json").write_text("{}")
        images(s / "func" / f"sub-{A}_ses-{ses}_task-nback_bold.nii.gz", bold_shape, 99)
    images(root / f"sub-{B}" / "anat" / f"sub-{B}_T1w.nii", t1_shape, 3)
    images(root / f"sub-{B}" / "func" / f"sub-{B}_task-rest_bold.nii.gz", bold_shape, 4)
    images(root / f"sub-{C}" / "anat" / f"sub-{C}_acq-fast_T1w.nii.gz", t1_shape, 5)
    images(root / f"sub-{C}" / "anat" / f"sub-{C}_acq-mprage_T1w.nii.gz", t1_shape, 6)
    return root


def test_names_follow_the_bids_rules():
    n = bids.parse_name("sub-01_ses-a_task-rest_run-02_bold.nii.gz")
    assert n == bids.BidsName(
        {"sub": "01", "ses": "a", "task": "rest", "run": "02"}, "bold", ".nii.gz"
    )
    assert n.run == 2
    assert bids.parse_name("sub-01_T1w.json").extension == ".json"
    for bad in ("T1w.nii.gz", "ses-a_sub-01_T1w.nii", "sub-01_task_bold.nii", "sub-01.nii", "sub-01_run-1-x_T1w.nii"):  # fmt: skip
        assert bids.parse_name(bad) is None, bad


def test_sessions_runs_and_missing_modalities(tmp_path):
    root = write_tree(tmp_path / "ds")
    found = bids.scan(root)
    rows = {r["subject_id"]: r for r in found.rows}
    assert list(rows) == [A, B, C]  # D has no folder, so no row
    assert found.columns == ["subject_id", "T1", "rsfMRI", "sex", "age"]
    # First session in sorted order (string order), run 1 of two.
    assert rows[A]["T1"].endswith(f"ses-2YearFollowUpYArm1/anat/sub-{A}_ses-2YearFollowUpYArm1_run-01_T1w.nii.gz")  # fmt: skip
    assert rows[A]["rsfMRI"].endswith(f"sub-{A}_ses-2YearFollowUpYArm1_task-rest_run-1_bold.nii.gz")
    assert rows[A]["sex"] == "M" and rows[A]["age"] == "10.5"
    assert rows[B]["T1"].endswith(f"sub-{B}_T1w.nii") and rows[B]["age"] == ""  # n/a -> blank
    assert rows[C]["T1"].endswith(f"sub-{C}_acq-fast_T1w.nii.gz") and rows[C]["rsfMRI"] == ""
    missing = {(m["subject_id"], m["modality"]): m["reason"] for m in found.missing}
    assert missing == {
        (C, "rsfMRI"): "no func/*_task-rest_*bold.nii[.gz]",
        (D, "T1"): f"no sub-{D} folder in {root}",
        (D, "rsfMRI"): f"no sub-{D} folder in {root}",
    }
    # --session overrides; a subject without that session is listed, not guessed.
    found = bids.scan(root, session="baselineYear1Arm1")
    rows = {r["subject_id"]: r for r in found.rows}
    assert list(rows) == [A]
    assert "ses-baselineYear1Arm1" in rows[A]["T1"] and "run-01" in rows[A]["T1"]
    reasons = {m["subject_id"]: m["reason"] for m in found.missing}
    assert reasons[B] == "no ses-baselineYear1Arm1 (sessions: none)"


def test_derivatives_prefer_preproc_and_need_a_space(tmp_path):
    root = write_tree(tmp_path / "ds")
    fmriprep = root / "derivatives" / "fmriprep" / f"sub-{B}"
    _touch(fmriprep / "anat" / f"sub-{B}_desc-preproc_T1w.nii.gz")
    _touch(fmriprep / "anat" / f"sub-{B}_desc-brain_mask.nii.gz")
    for space in ("MNI152NLin2009cAsym", "T1w"):
        _touch(fmriprep / "func" / f"sub-{B}_task-rest_space-{space}_desc-preproc_bold.nii.gz")
    with pytest.raises(UserError, match=r"several spaces \(MNI152NLin2009cAsym, T1w\).*--space"):
        bids.scan(root, derivatives="fmriprep")
    found = bids.scan(root, derivatives="fmriprep", space="MNI152NLin2009cAsym")
    (row,) = found.rows
    assert row["subject_id"] == B and row["T1"].endswith("desc-preproc_T1w.nii.gz")
    assert "space-MNI152NLin2009cAsym" in row["rsfMRI"]
    assert row["sex"] == "F"  # phenotypes from the raw dataset's participants.tsv


def test_cli_writes_the_manifest_and_the_missing_list(tmp_path, capsys):
    root = write_tree(tmp_path / "ds")
    out = tmp_path / "m" / "manifest.csv"
    assert pack_main(["manifest", "--bids", str(root), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert f"{C}: no rsfMRI" in captured.err and "3 subjects" in captured.out
    with open(out, newline="") as f:
        assert [r["subject_id"] for r in csv.DictReader(f)] == [A, B, C]
    with open(out.with_name("manifest.missing.csv"), newline="") as f:
        assert len(list(csv.DictReader(f))) == 3
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "participants.tsv").write_text("id\tsex\n")
    assert pack_main(["manifest", "--bids", str(bad), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith(
        f"error: {bad / 'participants.tsv'}:1: no participant_id"
    )


@pytest.mark.timeout(120)
def test_the_manifest_packs(tmp_path, capsys):
    root = write_tree(tmp_path / "ds", images=_nifti)
    manifest = tmp_path / "manifest.csv"
    assert pack_main(["manifest", "--bids", str(root), "--out", str(manifest)]) == 0
    out = tmp_path / "shards"
    rc = pack_main(["build", "--manifest", str(manifest), "--out", str(out), "--t1-size", "8", "8", "8",
                    "--rsfmri-size", "8", "8", "8", "--workers", "1", "--no-progress"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    from umbrella_ds.shards import open_dataset

    ds = open_dataset(out)
    assert sorted(ds.subjects) == [A, B, C]
    assert ds.has(A, "rsfMRI") and not ds.has(C, "rsfMRI") and ds.has(C, "T1")
    assert ds.phenotypes(A)["sex"] == "M"
