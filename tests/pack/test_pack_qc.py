"""Pack QC: ``build --dry-run`` writes nothing, ``info --preview`` draws a PNG of the expected size,
and packing leaves a provenance.json (also the provenance module itself)."""

from __future__ import annotations

import csv
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_prep.cli import main as cli_main
from data_prep.preview import CELL_PX, preview_size
from data_prep.synth import synth
from umbrella_ds import provenance
from umbrella_ds.shards import sha256_file

SIZES = ["--t1-size", "16", "16", "16", "--rsfmri-size", "8", "8", "8", "--subjects-per-shard", "2"]


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess:
    capsys.readouterr()
    rc = cli_main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), rc, out.out, out.err)


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``root`` with its size and mtime (what "nothing written" means)."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("qc_cohort")
    synth(out, 5, seed=4, t1_shape=(20, 24, 20), frames=6, rsfmri_shape=(12, 14, 12))
    return out


@pytest.fixture(scope="module")
def manifest_with_rejection(cohort: Path) -> Path:
    """The cohort plus one subject whose T1 holds NaN (found only by reading it)."""
    rows = list(csv.DictReader((cohort / "manifest.csv").read_text().splitlines()))
    bad = cohort / "bad_nan.nii.gz"
    data = np.ones((20, 24, 20), dtype=np.float32)
    data[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(bad))
    path = cohort / "with_bad.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
        w.writerow({**rows[0], "subjectkey": "BAD_NAN", "T1": str(bad), "rsfMRI": ""})
    return path


@pytest.mark.timeout(120)
def test_dry_run_reports_counts_size_rejections_and_writes_nothing(
    cohort: Path, manifest_with_rejection: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "never" / "shards"
    before = tree(cohort) | {"tmp": tree(tmp_path)}
    r = run_cli(
        capsys,
        "build", "--manifest", str(manifest_with_rejection), "--out", str(out), *SIZES,
        "--dry-run", "--no-progress",
    )  # fmt: skip
    assert r.returncode == 3, r.stdout + r.stderr
    assert not out.exists() and not out.parent.exists()
    assert tree(cohort) | {"tmp": tree(tmp_path)} == before
    assert "DRY RUN: nothing written" in r.stdout
    assert "6 subjects -> 3 shards" in r.stdout
    assert "would pack    5 subjects (T1: 5, rsfMRI: 5)" in r.stdout
    expected_mb = 5 * (16**3 + 6 * 8**3) * 2 / 1e6
    assert f"estimated     {expected_mb:.2f} MB" in r.stdout
    assert "would reject  1 input(s)" in r.stdout
    assert "BAD_NAN,T1," in r.stdout and "NaN/Inf" in r.stdout

    # A clean manifest: exit 0; the real build then packs what the dry run announced.
    r = run_cli(
        capsys, "build", "--manifest", str(cohort / "manifest.csv"), "--out", str(out), *SIZES,
        "--dry-run", "--no-progress",
    )  # fmt: skip
    assert r.returncode == 0 and "would reject  nothing" in r.stdout
    assert not out.parent.exists()


@pytest.mark.timeout(120)
def test_dry_run_checks_the_output_dir_like_a_build(
    cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "full"
    out.mkdir()
    (out / "index.json").write_text("{}")
    r = run_cli(
        capsys, "build", "--manifest", str(cohort / "manifest.csv"), "--out", str(out), *SIZES,
        "--dry-run", "--mpi",
    )  # fmt: skip
    assert r.returncode == 2 and "--dry-run" in r.stderr
    r = run_cli(
        capsys, "build", "--manifest", str(cohort / "manifest.csv"), "--out", str(out), *SIZES,
        "--dry-run", "--no-progress",
    )  # fmt: skip
    assert r.returncode == 2 and "--resume" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["index.json"]


@pytest.mark.timeout(180)
def test_pack_writes_provenance_and_preview_has_the_expected_size(
    cohort: Path, manifest_with_rejection: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "shards"
    r = run_cli(
        capsys, "build", "--manifest", str(manifest_with_rejection), "--out", str(out), *SIZES,
        "--no-progress",
    )  # fmt: skip
    assert r.returncode == 3, r.stderr
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["kind"] == "pack"
    assert prov["inputs"] == {"manifest": sha256_file(manifest_with_rejection)}
    assert prov["extra"]["index_sha256"] == sha256_file(out / "index.json")
    assert prov["extra"]["subjects"] == 5 and prov["extra"]["rejections"] == 1
    assert prov["config"]["preprocessing"]["T1"]["size"] == [16, 16, 16]
    assert prov["config"]["modalities"] == ["T1", "rsfMRI"]
    assert prov["command"] == sys.argv  # in-process here; the console script's argv in real use
    assert [x["rank"] for x in prov["ranks"]] == [0] and prov["ranks"][0]["host"]
    for pkg in ("torch", "deepspeed", "transformers", "numpy", "h5py", "umbrella-ds"):
        assert prov["versions"][pkg], pkg
    if prov["git"] is not None:
        assert len(prov["git"]["commit"]) == 40 and isinstance(prov["git"]["dirty"], bool)

    png = tmp_path / "qc" / "preview.png"
    r = run_cli(
        capsys, "info", str(out), "--preview", str(png), "--preview-subjects", "3", "--json"
    )
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert png_size(png) == preview_size(3, 2) == (6 * CELL_PX, 3 * CELL_PX + 40)
    assert len(info["preview"]["subjects"]) == 3
    # Deterministic sample: the same call picks the same subjects.
    r2 = run_cli(
        capsys, "info", str(out), "--preview", str(png), "--preview-subjects", "3", "--json"
    )
    assert json.loads(r2.stdout)["preview"]["subjects"] == info["preview"]["subjects"]
    # Fewer subjects than asked: every subject, one row each.
    r = run_cli(capsys, "info", str(out), "--preview", str(png), "--preview-subjects", "50")
    assert r.returncode == 0 and "5 subjects" in r.stdout
    assert png_size(png) == preview_size(5, 2)


def test_provenance_outside_a_git_checkout_and_kinds(tmp_path: Path) -> None:
    assert provenance.git_state(tmp_path) is None
    repo = Path(provenance.__file__).resolve().parents[1]
    if (repo / ".git").exists():
        state = provenance.git_state()
        assert state is not None and len(state["commit"]) == 40
    path = provenance.write_provenance(
        tmp_path,
        kind="eval",
        config={"a": 1},
        inputs={"checkpoint": "abc"},
        ranks=[{"rank": 0, "host": "h0", "node": "n0"}, {"rank": 1, "host": "h1", "node": "n1"}],
    )
    rec = json.loads(path.read_text())
    assert rec["kind"] == "eval" and rec["inputs"] == {"checkpoint": "abc"}
    assert [r["host"] for r in rec["ranks"]] == ["h0", "h1"]
    assert not [p for p in os.listdir(tmp_path) if p != "provenance.json"]  # no temporaries
    with pytest.raises(ValueError, match="kind"):
        provenance.write_provenance(tmp_path, kind="nope", config=None, inputs={})
