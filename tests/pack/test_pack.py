"""umbrella-pack build: determinism over workers/MPI ranks, resume after a kill, rejections, usage."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from data_prep.cli import main as cli_main
from data_prep.pack import BuildOptions, build
from data_prep.synth import synth
from umbrella_ds.scan.preprocess import preprocess
from umbrella_ds.shards import open_dataset, sha256_file

N_SUBJECTS = 8
SIZES = ["--t1-size", "16", "16", "16", "--rsfmri-size", "8", "8", "8", "--subjects-per-shard", "3"]
MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
}


def pack_cli(
    *args: str, env: dict[str, str] | None = None, timeout: int = 120
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data_prep.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def checksums(d: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(d.glob("shard-*.h5"))} | {
        "index.json": sha256_file(d / "index.json")
    }


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    synth(out, N_SUBJECTS, seed=3, t1_shape=(20, 24, 20), frames=6, rsfmri_shape=(12, 14, 12))
    return out


@pytest.fixture(scope="module")
def baseline(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Uninterrupted single-process pack: the reference every other pack must equal."""
    out = tmp_path_factory.mktemp("base") / "shards"
    r = pack_cli(
        "build",
        "--manifest",
        str(cohort / "manifest.csv"),
        "--out",
        str(out),
        *SIZES,
        "--workers",
        "1",
    )
    assert r.returncode == 0, r.stderr
    assert "ALL PACKED" in r.stdout
    return out


def test_layout_and_read_back_equals_preprocessing(cohort: Path, baseline: Path) -> None:
    assert sorted(p.name for p in baseline.glob("shard-*.h5")) == [
        f"shard-0000{i}.h5" for i in range(3)
    ]
    ds = open_dataset(baseline)
    with open(cohort / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    assert ds.subjects == [r["subjectkey"] for r in rows]
    assert ds.modalities == ["T1", "rsfMRI"]
    assert ds.shape("T1") == (16, 16, 16) and ds.shape("rsfMRI") == (8, 8, 8)
    for i, r in enumerate(rows):
        sid = r["subjectkey"]
        assert ds.index["subjects"][i]["shard"] == i // 3
        assert ds.phenotypes(sid) == {
            "sex": int(r["sex"]),
            "age": int(r["age"]),
            "BMI_sds": float(r["BMI_sds"]),
        }
        t1 = ds.read(sid, "T1")
        assert t1.dtype == np.float16 and t1.shape == (16, 16, 16)
        np.testing.assert_array_equal(t1, preprocess("T1", cohort / r["T1"], ds.preprocessing))
        assert ds.num_frames(sid) == 6
        full = preprocess("rsfMRI", cohort / r["rsfMRI"], ds.preprocessing)
        win = ds.read_window(sid, "rsfMRI", 2, 3)
        assert win.dtype == np.float16 and win.shape == (8, 8, 8, 3)
        np.testing.assert_array_equal(win, full[..., 2:5])
        info = ds.subject_info(sid, "T1")
        assert info["original_shape"] == [20, 24, 20] and len(info["source_sha256"]) == 64
        assert info["orientation"] in ("RAS", "LAS")
    assert {ds.subject_info(s, "T1")["orientation"] for s in ds.subjects} == {"RAS", "LAS"}


@pytest.mark.timeout(180)
def test_two_workers_give_identical_bytes(cohort: Path, baseline: Path, tmp_path: Path) -> None:
    out = tmp_path / "w2"
    r = pack_cli(
        "build",
        "--manifest",
        str(cohort / "manifest.csv"),
        "--out",
        str(out),
        *SIZES,
        "--workers",
        "2",
    )
    assert r.returncode == 0, r.stderr
    assert checksums(out) == checksums(baseline)


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_mpi_two_ranks_give_identical_bytes(cohort: Path, baseline: Path, tmp_path: Path) -> None:
    assert shutil.which("mpirun"), "OpenMPI's mpirun is required (make system-deps installs it)"
    out = tmp_path / "mpi"
    probe = tmp_path / "ranks.txt"
    cmd = [
        "mpirun", "-np", "2", "--oversubscribe", "--allow-run-as-root",
        sys.executable, "-c",
        "import sys; from mpi4py import MPI; "
        f"open('{probe}', 'a').write(f'{{MPI.COMM_WORLD.Get_rank()}}/{{MPI.COMM_WORLD.Get_size()}}\\n'); "
        "from data_prep.cli import main; sys.exit(main())",
        "build", "--manifest", str(cohort / "manifest.csv"), "--out", str(out), *SIZES, "--mpi", "--no-progress",
    ]  # fmt: skip
    r = subprocess.run(
        cmd, capture_output=True, text=True, timeout=200, env={**os.environ, **MPI_ENV}
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(probe.read_text().split()) == ["0/2", "1/2"]  # really two ranks
    assert r.stdout.count("ALL PACKED") == 1  # rank 0 alone summarises
    assert checksums(out) == checksums(baseline)


@pytest.mark.timeout(180)
def test_killed_pack_resumes_to_identical_bytes(
    cohort: Path, baseline: Path, tmp_path: Path
) -> None:
    out = tmp_path / "killed"
    args = ["build", "--manifest", str(cohort / "manifest.csv"), "--out", str(out), *SIZES]
    r = pack_cli(*args, env={"UMBRELLA_PACK_TEST_DIE_AFTER_SHARD": "1"})
    assert r.returncode == 137, r.stderr
    assert not (out / "index.json").exists()  # index is written last
    assert sorted(p.name for p in out.glob("shard-*.h5")) == ["shard-00000.h5", "shard-00001.h5"]
    done = {p.name: sha256_file(p) for p in out.glob("shard-*.h5")}
    # A stale temporary from the killed run must not survive or be mistaken for a shard.
    (out / ".shard-00002.h5.tmp999").write_bytes(b"half a shard")
    r = pack_cli(*args)
    assert r.returncode == 2 and "--resume" in r.stderr  # refuses to overwrite without --resume
    r = pack_cli(*args, "--resume")
    assert r.returncode == 0, r.stderr
    assert "2 kept from an earlier run" in r.stdout
    assert not list(out.glob(".shard-*"))
    assert checksums(out) == checksums(baseline)
    assert {n: sha256_file(out / n) for n in done} == done


def test_resume_rebuilds_a_corrupt_or_changed_shard(
    cohort: Path, baseline: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "again"
    shutil.copytree(baseline, out)
    p = out / "shard-00001.h5"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    opts = BuildOptions(
        manifest=cohort / "manifest.csv", out=out, sizes={"T1": (16, 16, 16), "rsfMRI": (8, 8, 8)},
        subjects_per_shard=3, resume=True, progress=False,
    )  # fmt: skip
    assert build(opts) == 0
    assert "2 kept from an earlier run" in capsys.readouterr().out
    assert checksums(out) == checksums(baseline)
    # A changed phenotype changes that shard's job: it is rebuilt, the others are kept.
    manifest = cohort / "manifest_changed.csv"  # same folder: same resolved source paths
    text = (cohort / "manifest.csv").read_text().splitlines()
    cells = text[-1].split(",")
    cells[-1] = "2.5"
    manifest.write_text("\n".join([*text[:-1], ",".join(cells)]) + "\n")
    opts.manifest = manifest
    assert build(opts) == 0
    assert "2 kept from an earlier run" in capsys.readouterr().out
    new = checksums(out)
    old = checksums(baseline)
    assert new["shard-00000.h5"] == old["shard-00000.h5"]
    assert new["shard-00001.h5"] == old["shard-00001.h5"]
    assert new["shard-00002.h5"] != old["shard-00002.h5"]
    assert open_dataset(out).phenotypes(cells[0])["BMI_sds"] == 2.5


def test_rsfmri_nifti_and_frame_folders_pack_equal(
    cohort: Path, baseline: Path, tmp_path: Path
) -> None:
    rows = list(csv.DictReader((cohort / "manifest.csv").read_text().splitlines()))
    manifest = cohort / "manifest_nifti.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({**r, "rsfMRI": f"rsfmri_nifti/{r['subjectkey']}.nii.gz"})
    out = tmp_path / "nifti"
    opts = BuildOptions(manifest=manifest, out=out, modalities=["rsfMRI"], sizes={"rsfMRI": (8, 8, 8)},
                        subjects_per_shard=3, progress=False)  # fmt: skip
    assert build(opts) == 0
    a, b = open_dataset(out), open_dataset(baseline)
    assert a.modalities == ["rsfMRI"]
    for sid in b.subjects:
        assert a.subject_info(sid, "rsfMRI")["stats_source"] == "per_subject"
        assert b.subject_info(sid, "rsfMRI")["stats_source"] == "global_stats.pt"
        np.testing.assert_array_equal(a.read(sid, "rsfMRI"), b.read(sid, "rsfMRI"))


def _bad_inputs(d: Path, good_t1: Path, good_rs: Path) -> list[tuple[str, str, str, str]]:
    """(subject, T1 cell, rsfMRI cell, expected reason fragment) for every rejection reason."""
    d.mkdir()
    aff = np.eye(4)
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8, 3), np.float32), aff), str(d / "four_d.nii.gz"))
    nib.save(nib.Nifti1Image(np.full((8, 8, 8), np.inf, np.float32), aff), str(d / "inf.nii.gz"))
    nan = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)
    nan[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(nan, aff), str(d / "nan.nii.gz"))
    nib.save(nib.Nifti1Image(np.full((8, 8, 8), 5.0, np.float32), aff), str(d / "const.nii.gz"))
    (d / "garbage.nii.gz").write_bytes(b"\x1f\x8b garbage" * 50)
    full = good_t1.read_bytes()
    (d / "trunc.nii.gz").write_bytes(full[: len(full) // 2])
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), aff), str(d / "three_d_rs.nii.gz"))
    big = np.full((8, 8, 8, 2), 1e5, np.float32)
    big[0, 0, 0, 0] = 2e5
    nib.save(nib.Nifti1Image(big, aff), str(d / "huge_rs.nii.gz"))
    gap = d / "gap"
    shutil.copytree(good_rs, gap)
    (gap / "frame_2.pt").unlink()
    zero = d / "zero"
    zero.mkdir()
    torch.save(torch.zeros(8, 8, 8), zero / "frame_0.pt")
    return [
        ("BAD_MISSING", str(d / "nope.nii.gz"), "", "missing file"),
        ("BAD_GARBAGE", str(d / "garbage.nii.gz"), "", "unreadable"),
        ("BAD_TRUNC", str(d / "trunc.nii.gz"), "", "unreadable"),
        ("BAD_4D_T1", str(d / "four_d.nii.gz"), "", "wrong dimensionality"),
        ("BAD_NAN", str(d / "nan.nii.gz"), "", "NaN/Inf"),
        ("BAD_INF", str(d / "inf.nii.gz"), "", "NaN/Inf"),
        ("BAD_CONST", str(d / "const.nii.gz"), "", "constant volume"),
        ("BAD_3D_RS", "", str(d / "three_d_rs.nii.gz"), "wrong dimensionality"),
        ("BAD_F16", "", str(d / "huge_rs.nii.gz"), "float16 overflow"),
        ("BAD_GAP", "", str(gap), "missing frame 2"),
        ("BAD_EMPTY", "", str(zero), "empty image"),
        ("BAD_NONE", "", "", "no image listed"),
    ]


@pytest.mark.timeout(120)
def test_every_rejection_reason_is_listed_and_the_rest_packed(cohort: Path, tmp_path: Path) -> None:
    rows = list(csv.DictReader((cohort / "manifest.csv").read_text().splitlines()))
    good = rows[0]
    bad = _bad_inputs(tmp_path / "bad", cohort / good["T1"], cohort / good["rsfMRI"])
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["subject_id", "T1", "rsfMRI", "sex"])
        w.writerow(["GOOD", str(cohort / good["T1"]), str(cohort / good["rsfMRI"]), "1"])
        w.writerow(["T1_ONLY", str(cohort / good["T1"]), "", "2"])  # missing modality: allowed
        w.writerow(
            ["HALF", str(tmp_path / "bad" / "nan.nii.gz"), str(cohort / good["rsfMRI"]), "1"]
        )
        for sid, t1, rs, _ in bad:
            w.writerow([sid, t1, rs, "1"])
    out = tmp_path / "out"
    r = pack_cli(
        "build", "--manifest", str(manifest), "--out", str(out), *SIZES, "--rsfmri-norm", "none"
    )
    assert r.returncode == 3, r.stdout + r.stderr
    assert "PACKED WITH REJECTIONS" in r.stdout and "rejected.csv" in r.stdout
    rejected = list(csv.DictReader((out / "rejected.csv").read_text().splitlines()))
    assert list(rejected[0]) == ["subject_id", "modality", "path", "reason"]
    got = {(x["subject_id"], x["modality"]): x["reason"] for x in rejected}
    assert got.pop(("HALF", "T1")).startswith("NaN/Inf")
    for sid, t1, _, reason in bad:
        modality = "T1" if t1 else ("rsfMRI" if sid != "BAD_NONE" else "*")
        assert reason in got.pop((sid, modality)), sid
    assert got == {}
    ds = open_dataset(out)
    assert ds.subjects == ["GOOD", "T1_ONLY", "HALF"]
    assert ds.has("T1_ONLY", "T1") and not ds.has("T1_ONLY", "rsfMRI")
    assert ds.has("HALF", "rsfMRI") and not ds.has("HALF", "T1")
    assert [s["shard"] for s in ds.index["subjects"]] == [0, 0, 0]
    # Nothing packable at all is a failure (exit 1), with the reasons still listed.
    only_bad = tmp_path / "only_bad.csv"
    only_bad.write_text("subject_id,T1\nX," + str(tmp_path / "bad" / "const.nii.gz") + "\n")
    r = pack_cli("build", "--manifest", str(only_bad), "--out", str(tmp_path / "none"), *SIZES)
    assert r.returncode == 1 and "FAILED" in r.stderr
    assert not (tmp_path / "none" / "index.json").exists()
    assert "constant volume" in (tmp_path / "none" / "rejected.csv").read_text()


def _in_process(capsys: pytest.CaptureFixture[str]):
    """The CLI's main() in this process (no interpreter start): returns a CompletedProcess."""

    def call(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        try:
            rc = cli_main(list(args))
        except SystemExit as exc:  # argparse rejects bad flags with status 2
            rc = int(exc.code or 0)
        out = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), rc, out.out, out.err)

    return call


@pytest.mark.timeout(60)
def test_usage_errors_exit_2_naming_the_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pack_cli = _in_process(capsys)
    dup = tmp_path / "dup.csv"
    dup.write_text("subjectkey,T1\nA,a.nii.gz\nB,b.nii.gz\nA,c.nii.gz\n")
    r = pack_cli("build", "--manifest", str(dup), "--out", str(tmp_path / "o1"))
    assert r.returncode == 2 and "duplicate subject id 'A'" in r.stderr
    noid = tmp_path / "noid.csv"
    noid.write_text("name,T1\nA,a.nii.gz\n")
    r = pack_cli("build", "--manifest", str(noid), "--out", str(tmp_path / "o2"))
    assert r.returncode == 2 and "subject_id or subjectkey" in r.stderr
    not1 = tmp_path / "not1.csv"
    not1.write_text("subject_id,rsfMRI\nA,a\n")
    r = pack_cli(
        "build", "--manifest", str(not1), "--out", str(tmp_path / "o4"), "--modalities", "T1"
    )
    assert r.returncode == 2 and "missing column(s) ['T1']" in r.stderr
    r = pack_cli("build", "--manifest", str(tmp_path / "absent.csv"), "--out", str(tmp_path / "o5"))
    assert r.returncode == 2 and "absent.csv" in r.stderr
    r = pack_cli(
        "build", "--manifest", str(dup), "--out", str(tmp_path / "o6"), "--compression", "zstd"
    )
    assert r.returncode == 2


@pytest.mark.timeout(60)
def test_verify_and_info_cli(
    baseline: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pack_cli = _in_process(capsys)
    r = pack_cli("verify", str(baseline))
    assert r.returncode == 0 and "OK" in r.stdout
    r = pack_cli("info", str(baseline), "--json")
    info = json.loads(r.stdout)
    assert info["subjects"] == N_SUBJECTS and info["dtype"] == "float16"
    assert info["shapes"] == {"T1": [16, 16, 16], "rsfMRI": [8, 8, 8]}
    assert info["bytes_uncompressed"] == N_SUBJECTS * (16**3 + 6 * 8**3) * 2
    assert info["compression_ratio"] > 0
    r = pack_cli("info", str(baseline))
    assert "compression" in r.stdout and "ratio" in r.stdout
    bad = tmp_path / "bad"
    shutil.copytree(baseline, bad)
    p = bad / "shard-00001.h5"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    r = pack_cli("verify", str(bad))
    assert r.returncode == 1
    assert "shard-00001.h5" in r.stderr and "sha256" in r.stderr
    assert "shard-00000.h5" not in r.stderr
