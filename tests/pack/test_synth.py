"""Synthetic cohort: files, splits, instruction format, and phenotypes visible in the images."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep.synth import synth
from umbrella_ds.scan.readers import read_frame_folder, read_nifti

N = 20


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synth(out, N, seed=1, t1_shape=(24, 28, 24), frames=4, rsfmri_shape=(12, 14, 12))
    return out


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_files_and_phenotypes(cohort: Path) -> None:
    pheno = list(csv.DictReader((cohort / "phenotypes.csv").read_text().splitlines()))
    assert len(pheno) == N and list(pheno[0]) == ["subjectkey", "sex", "age", "BMI_sds"]
    keys = [p["subjectkey"] for p in pheno]
    assert len(set(keys)) == N and all(k.startswith("NDARINV") and len(k) == 15 for k in keys)
    assert {p["sex"] for p in pheno} == {"1", "2"}
    assert all(108 <= int(p["age"]) < 132 for p in pheno)
    manifest = list(csv.DictReader((cohort / "manifest.csv").read_text().splitlines()))
    assert list(manifest[0])[:3] == ["subjectkey", "T1", "rsfMRI"]
    for row in manifest:
        key = row["subjectkey"]
        assert (cohort / row["T1"]).name == f"{key}.nii.gz"
        assert row["rsfMRI"] == f"rsfmri_frames/img/{key}"
        assert (cohort / "rsfmri_nifti" / f"{key}.nii.gz").is_file()
        assert (cohort / row["rsfMRI"] / "global_stats.pt").is_file()
    orientations = {read_nifti(cohort / r["T1"], 3).orientation for r in manifest}
    assert orientations == {"RAS", "LAS"}


def test_frame_folder_holds_the_same_series_as_the_nifti(cohort: Path) -> None:
    key = next(iter(csv.DictReader((cohort / "manifest.csv").read_text().splitlines())))[
        "subjectkey"
    ]
    a = read_nifti(cohort / "rsfmri_nifti" / f"{key}.nii.gz", 4).data
    b = read_frame_folder(cohort / "rsfmri_frames" / "img" / key)
    np.testing.assert_array_equal(a, b.data)
    assert a.shape == (4, 12, 14, 12)
    assert b.global_stats is not None and b.global_stats["valid_voxels"] == float((a != 0).sum())


def test_splits_and_instruction_format(cohort: Path) -> None:
    inst = cohort / "instructions"
    names = sorted(p.name for p in inst.iterdir())
    assert names == sorted(
        f"{t}_{s}.jsonl"
        for t in ("t1_sex", "t3_sex", "bmi", "rsfmri_sex")
        for s in ("train", "eval")
    )
    train = {r["metadata"]["subject_id"] for r in _jsonl(inst / "t1_sex_train.jsonl")}
    evals = {r["metadata"]["subject_id"] for r in _jsonl(inst / "t1_sex_eval.jsonl")}
    assert len(train) == 16 and len(evals) == 4 and not train & evals
    pheno = {
        p["subjectkey"]: p
        for p in csv.DictReader((cohort / "phenotypes.csv").read_text().splitlines())
    }
    for split, members in (("train", train), ("eval", evals)):
        for r in _jsonl(inst / f"t1_sex_{split}.jsonl"):
            sid = r["metadata"]["subject_id"]
            answer = r["conversations"][1]["content"][0]["text"]
            assert answer == {"1": "male.", "2": "female."}[pheno[sid]["sex"]]
            assert r["metadata"]["subject_label"] == answer[:-1]
            assert (
                r["images"][0]["path"]
                == r["conversations"][0]["content"][0]["image_path"]
                == f"t1/{sid}.nii.gz"
            )
            assert r["task_type"] == "T1" and r["modalities"] == ["sMRI"]
        for r in _jsonl(inst / f"t3_sex_{split}.jsonl"):
            assert r["task_type"] == "T3" and len(r["images"]) == 2 and len(r["conversations"]) == 4
            assert [c["role"] for c in r["conversations"]] == [
                "user",
                "assistant",
                "user",
                "assistant",
            ]
            ref, query = r["subject_ids"]
            assert ref != query and {ref, query} <= members  # pairs drawn within a split
            assert (
                r["conversations"][3]["content"][0]["text"]
                == {"1": "male.", "2": "female."}[pheno[query]["sex"]]
            )
        for r in _jsonl(inst / f"bmi_{split}.jsonl"):
            text = r["conversations"][1]["content"][0]["text"]
            assert text == f"{float(pheno[r['metadata']['subject_id']]['BMI_sds']):.1f}"
        rs = _jsonl(inst / f"rsfmri_sex_{split}.jsonl")
        assert {r["metadata"]["subject_id"] for r in rs} == members
        assert all(r["images"][0]["modality"] == "rsfMRI" for r in rs)


def _blob_side(vol: np.ndarray) -> float:
    """Mean intensity near the left blob site minus its mirror on the right (RAS array)."""
    axes = [(np.arange(n) + 0.5) / n * 2 - 1 for n in vol.shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    near = ((np.abs(x) - 0.4) ** 2 + (y - 0.1) ** 2 + (z - 0.25) ** 2) < 0.15**2
    return float(vol[near & (x < 0)].mean() - vol[near & (x > 0)].mean())


def test_sex_is_visible_left_vs_right_after_reorientation(cohort: Path) -> None:
    """The blob side predicts sex in T1 (LAS-stored subjects included) and in rsfMRI.

    The signal is deliberately faint (3x the smoothed noise, learnable: docs/BENCHMARKS.md),
    so single subjects may be wrong; most must be right.
    """
    pheno = {
        p["subjectkey"]: int(p["sex"])
        for p in csv.DictReader((cohort / "phenotypes.csv").read_text().splitlines())
    }
    t1_right, rs_right, las_right, n_las = 0, 0, 0, 0
    for key, sex in pheno.items():
        src = read_nifti(cohort / "t1" / f"{key}.nii.gz", 3)
        ok = (_blob_side(src.data) > 0) == (sex == 1)
        t1_right += ok
        if src.orientation == "LAS":
            n_las += 1
            las_right += ok
        series = read_frame_folder(cohort / "rsfmri_frames" / "img" / key).data.mean(axis=0)
        rs_right += (_blob_side(series) > 0) == (sex == 1)
    assert t1_right >= 0.85 * N and rs_right >= 0.85 * N, (t1_right, rs_right)
    assert n_las >= 4 and las_right >= n_las - 1


def test_bmi_thickens_the_scalp(tmp_path: Path) -> None:
    synth(tmp_path, 12, seed=2, t1_shape=(32, 32, 32), frames=2, rsfmri_shape=(8, 8, 8))
    pheno = list(csv.DictReader((tmp_path / "phenotypes.csv").read_text().splitlines()))
    bmi, scalp = [], []
    for p in pheno:
        vol = read_nifti(tmp_path / "t1" / f"{p['subjectkey']}.nii.gz", 3).data
        line = vol[16, 16, :]  # superior ray from the centre: brain, skull, then scalp (~60)
        scalp.append(int(((line > 40) & (line < 80)).sum()))
        bmi.append(float(p["BMI_sds"]))
    assert np.corrcoef(bmi, scalp)[0, 1] > 0.5


@pytest.mark.timeout(120)
def test_cli_is_deterministic(tmp_path: Path) -> None:
    for name in ("a", "b"):
        r = subprocess.run(
            [sys.executable, "-m", "data_prep.cli", "synth", "--out", str(tmp_path / name), "--subjects", "4",
             "--seed", "7", "--t1-shape", "16", "16", "16", "--frames", "2", "--rsfmri-shape", "8", "8", "8"],
            capture_output=True, text=True, timeout=100,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
    for rel in ("phenotypes.csv", "manifest.csv", "instructions/t3_sex_train.jsonl"):
        assert (tmp_path / "a" / rel).read_text() == (tmp_path / "b" / rel).read_text()
    key = (tmp_path / "a" / "phenotypes.csv").read_text().splitlines()[1].split(",")[0]
    a = read_nifti(tmp_path / "a" / "t1" / f"{key}.nii.gz", 3).data
    np.testing.assert_array_equal(a, read_nifti(tmp_path / "b" / "t1" / f"{key}.nii.gz", 3).data)


def test_rsfmri_is_brain_in_a_constant_background(tmp_path: Path) -> None:
    """Realistic rsfMRI: a brain mask of the documented fraction (1/3 of the box), the same in
    every frame; background exactly 0 (constant after normalisation); noisy inside."""
    from data_prep.synth import BRAIN_FRACTION, brain_mask
    from umbrella_ds.scan.preprocess import make_params_for, series_from_source
    from umbrella_ds.scan.readers import read_series

    synth(tmp_path, 2, seed=3, t1_shape=(16, 16, 16), frames=6, rsfmri_shape=(32, 32, 32))
    key = (tmp_path / "phenotypes.csv").read_text().splitlines()[1].split(",")[0]
    series = read_frame_folder(tmp_path / "rsfmri_frames" / "img" / key).data  # (T, X, Y, Z)
    inside = series != 0
    assert (inside == inside[0]).all()  # one mask for the whole series
    assert abs(inside[0].mean() - BRAIN_FRACTION) < 0.02, inside[0].mean()
    np.testing.assert_array_equal(inside[0], brain_mask((32, 32, 32)))
    assert abs(brain_mask((96, 96, 96)).mean() - BRAIN_FRACTION) < 0.01
    brain = series[:, inside[0]]
    assert brain.std(axis=0).mean() > 0.02 * brain.mean()  # voxels fluctuate over time
    params = make_params_for({"rsfMRI": (32, 32, 32)}, {"rsfMRI": "znorm_minback"})
    src = read_series(tmp_path / "rsfmri_frames" / "img" / key)
    out, _ = series_from_source(src, params, "rsfMRI")
    background = out[0][~inside[0]]  # (T, D, H, W) after normalisation
    assert background.size and (background == background.flat[0]).all()
