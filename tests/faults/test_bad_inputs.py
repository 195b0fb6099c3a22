"""The bad-input matrix: each bad input ends in a clear error naming the file/key, or in the
documented counted skip. Cases already tested elsewhere are referenced, not repeated:

packing (umbrella-pack build; rejected.csv rows, exit 3, or usage error exit 2):
  truncated .nii.gz, wrong dimensionality, NaN voxels, constant volume, rsfMRI float16 overflow,
  missing path       -> tests/pack/test_pack.py::test_every_rejection_reason_is_listed_and_the_rest_packed
  duplicate subject id, manifest missing a column, absent manifest
                     -> tests/pack/test_pack.py::test_usage_errors_exit_2_naming_the_problem
  killed pack + --resume -> tests/pack/test_pack.py::test_killed_pack_resumes_to_identical_bytes
training, unit level:
  malformed JSONL line, unknown modality, <image> count, missing subject
                     -> tests/data/test_data_instructions.py
  over-long conversation (reject / truncate) -> tests/data/test_data_render.py::test_overflow_*
  unknown key / wrong type -> tests/train/test_config.py::test_errors_name_the_key, *_unknown_key_*

Here: the cases not yet covered (T1 float16 overflow with --t1-norm none; manifest paths relative
to the manifest, not the working directory) and every training case through the path training
really takes (``train.inputs.build_inputs`` and the ``umbrella-train`` CLI's exit status 2).
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_prep.cli import main as pack_main
from umbrella_ds.config import load_config
from umbrella_ds.data import InstructionError
from umbrella_ds.model import build_model
from umbrella_ds.train.cli import main as train_main
from umbrella_ds.train.inputs import build_inputs

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo.yaml"
SIZES = ["--t1-size", "8", "8", "8", "--modalities", "T1", "--no-progress", "--workers", "1"]


# ------------------------------------------------------------------------------- packing


def _pack(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = pack_main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _nifti(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), str(path))
    return path


@pytest.mark.timeout(120)
def test_t1_float16_overflow_without_normalisation_is_rejected(tmp_path, capsys):
    rng = np.random.default_rng(0)
    _nifti(tmp_path / "img" / "ok.nii.gz", rng.random((10, 10, 10)) + 1)
    _nifti(tmp_path / "img" / "huge.nii.gz", rng.random((10, 10, 10)) * 1e6 + 1e5)
    manifest = tmp_path / "m.csv"
    manifest.write_text("subject_id,T1\nOK,img/ok.nii.gz\nHUGE,img/huge.nii.gz\n")
    out = tmp_path / "out"
    rc, stdout, _ = _pack(
        capsys, "build", "--manifest", str(manifest), "--out", str(out), "--t1-norm", "none",
        *SIZES,
    )  # fmt: skip
    assert rc == 3, stdout  # packed with rejections
    rows = list(csv.DictReader((out / "rejected.csv").open()))
    assert [(r["subject_id"], r["modality"]) for r in rows] == [("HUGE", "T1")]
    assert rows[0]["reason"].startswith("float16 overflow after normalisation")
    assert rows[0]["path"].endswith("img/huge.nii.gz")
    assert [s["id"] for s in json.loads((out / "index.json").read_text())["subjects"]] == ["OK"]


@pytest.mark.timeout(120)
def test_manifest_paths_resolve_relative_to_the_manifest(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(1)
    _nifti(tmp_path / "cohort" / "img" / "a.nii.gz", rng.random((10, 10, 10)) + 1)
    manifest = tmp_path / "cohort" / "m.csv"
    manifest.write_text("subject_id,T1\nA,img/a.nii.gz\n")
    elsewhere = tmp_path / "elsewhere"
    _nifti(elsewhere / "img" / "a.nii.gz", np.full((10, 10, 10), 3.0))  # would be "constant"
    monkeypatch.chdir(elsewhere)
    rc, stdout, stderr = _pack(
        capsys, "build", "--manifest", str(manifest), "--out", str(tmp_path / "out"), *SIZES
    )
    # The image in the working directory is constant and would be rejected: a clean pack with
    # no rejection means the path was read relative to the manifest.
    assert rc == 0, stdout + stderr
    assert len((tmp_path / "out" / "rejected.csv").read_text().splitlines()) == 1  # header only


# ------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def tiny():
    return build_model("tiny", modalities={"T1": {"size": [32, 32, 32], "patch": [8, 8, 8]}})


def _task(sid: str, **over) -> dict:
    task = {
        "task_id": f"t1_sex_{sid}",
        "task_type": "T1",
        "subject_ids": [sid],
        "modalities": ["sMRI"],
        "images": [{"path": f"t1/{sid}.nii.gz", "token": "<image>", "modality": "sMRI"}],
        "conversations": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "modality": "sMRI", "image_path": f"t1/{sid}.nii.gz"},
                    {"type": "text", "text": "Sex? Answer male or female."},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "male."}]},
        ],
    }
    task.update(over)
    return task


def _subjects(train_data: Path) -> list[str]:
    return [
        s["id"] for s in json.loads((train_data / "shards" / "index.json").read_text())["subjects"]
    ]


def _inputs(train_data, tiny, tmp_path, lines: list[str], **sets):
    path = tmp_path / "inst" / "train.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    overrides = [f"data.shards={train_data / 'shards'}", f"data.train=[{path}]", "data.eval=[]"]
    overrides += [f"{k}={v}" for k, v in sets.items()]
    cfg = load_config(DEMO, overrides)
    model, tok = tiny
    return path, build_inputs(cfg.data, cfg.model, model, tok, 0)


def _good(train_data, n: int = 3) -> list[str]:
    return [json.dumps(_task(s)) for s in _subjects(train_data)[:n]]


def _malformed(good):
    return [*good[:1], '{"task_id": "broken", ', *good[1:]], r":2: malformed JSON"


def _unknown_modality(good):
    bad = json.loads(good[1])
    bad["modalities"] = ["DWI"]
    bad["images"][0]["modality"] = "DWI"
    bad["conversations"][0]["content"][0]["modality"] = "DWI"
    return [good[0], json.dumps(bad), good[2]], r":2: .*unknown modality 'DWI'"


def _image_count(good):
    bad = json.loads(good[2])
    bad["conversations"][0]["content"].insert(0, {"type": "image", "modality": "sMRI"})
    return [*good[:2], json.dumps(bad)], r"image"


@pytest.mark.parametrize(
    "make", [_malformed, _unknown_modality, _image_count], ids=lambda f: f.__name__[1:]
)
def test_bad_instruction_names_file_and_line(train_data, tiny, tmp_path, make):
    lines, pattern = make(_good(train_data))
    with pytest.raises(InstructionError, match=pattern) as err:
        _inputs(train_data, tiny, tmp_path, lines)
    assert "train.jsonl" in str(err.value)


def test_absent_subject_is_an_error_listing_task_ids(train_data, tiny, tmp_path):
    lines = [*_good(train_data), json.dumps(_task("NDARGONE"))]
    with pytest.raises(InstructionError, match=r"1 task\(s\).*t1_sex_NDARGONE"):
        _inputs(train_data, tiny, tmp_path, lines)


def test_absent_subject_is_a_counted_skip_when_asked(train_data, tiny, tmp_path, caplog):
    lines = [*_good(train_data), json.dumps(_task("NDARGONE"))]
    with caplog.at_level(logging.WARNING):
        _, inputs = _inputs(train_data, tiny, tmp_path, lines, **{"data.missing_subjects": "skip"})
    assert len(inputs.train_set) == 3
    assert "skipped 1 task(s) whose subjects are not in" in caplog.text


def test_over_long_conversation_is_a_counted_reject(train_data, tiny, tmp_path, caplog):
    long = _task(_subjects(train_data)[3])
    long["conversations"][1]["content"][0]["text"] = "male. " * 400
    lines = [*_good(train_data), json.dumps(long)]
    with caplog.at_level(logging.WARNING):
        _, inputs = _inputs(train_data, tiny, tmp_path, lines, **{"data.max_length": 128})
    assert inputs.train_set.num_rejected == 1
    assert "1 task(s) longer than data.max_length were rejected" in caplog.text


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.lr_schedule=cosine", "train.lr_schedule"),
        ("train.max_steps=many", "train.max_steps"),
    ],
)
def test_config_error_exits_2_naming_the_key(override, key, capsys):
    rc = train_main(["--config", str(DEMO), "--set", override])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {key}: ") and "Traceback" not in err, err


def test_relative_data_paths_resolve_against_the_working_directory(tmp_path, monkeypatch):
    """Config data paths resolve against the current directory (as configs/demo.yaml says), once,
    at load time, to absolute paths: every rank reads the same files wherever it starts."""
    shutil.copy(DEMO, tmp_path / "run.yaml")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(tmp_path / "run.yaml")
    assert cfg.data.train == [str(tmp_path / "runs/demo-data/raw/instructions/t1_sex_train.jsonl")]
