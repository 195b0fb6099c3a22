"""The predecessor's users move in (issue 24, "Done when"): a cohort packed from instruction files
in the predecessor's forms trains and evaluates on them, in one 2-rank run with an HF-Trainer-style
DeepSpeed JSON (no optimizer section, "auto" values, an offload block that a CPU run drops).

The material is tests/helpers/umbrella_forms.py: T1 JSONL answering ``"female."``, T3 JSON folders
answering in sentences and T3 JSONL answering ``"female."`` (one task, two answer styles), every
record carrying ``metadata.subject_label``; image paths are cluster paths that ``--path-map``
rewrites.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers.training import BIN, env, run_train
from helpers.umbrella_forms import write_umbrella_forms

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

NAMES = ("sex_classification", "sex_comparison_conversations", "sex_comparison_simple")


def _run(cmd: list, tmp: Path) -> None:
    done = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=600, env=env(), cwd=tmp
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.timeout(1500)
def test_predecessor_material_trains_and_evaluates_with_an_hf_json(tmp_path: Path) -> None:
    forms = write_umbrella_forms(tmp_path / "umbrella", subjects=12)
    manifest = tmp_path / "subjects.csv"
    maps = [a for m in forms.path_maps for a in ("--path-map", m)]
    _run(
        [BIN / "umbrella-pack", "manifest", "--instructions",
         *forms.files("train", NAMES), *forms.files("test", NAMES),
         "--phenotypes", forms.phenotypes, *maps, "--out", manifest],
        tmp_path,
    )  # fmt: skip
    shards = tmp_path / "shards"
    _run(
        [BIN / "umbrella-pack", "build", "--manifest", manifest, "--out", shards,
         "--modalities", "T1", "--t1-size", "32", "32", "32", "--workers", "1"],
        tmp_path,
    )  # fmt: skip

    out = tmp_path / "run"
    train = ", ".join(str(p) for p in forms.files("train", NAMES))
    test = ", ".join(str(p) for p in forms.files("test", NAMES))
    sets = [
        f"output_dir={out}", f"data.shards={shards}", f"data.train=[{train}]",
        f"data.eval=[{test}]", "data.max_length=512", "train.deepspeed=" + str(forms.ds_json),
        "train.max_steps=4", "train.global_batch=4", "train.micro_batch=1",
        "train.warmup_steps=1", "checkpoint.every_steps=0", "eval.at_end=true",
        "eval.micro_batch=4", "log.progress=false", "log.tensorboard=false", "log.every_steps=1",
    ]  # fmt: skip
    done = run_train(2, sets, timeout=1200)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in records if r["split"] == "start")
    ds = start["deepspeed"]
    assert ds["optimizer"]["type"] == "AdamW"  # filled from the run config: the JSON had none
    assert "offload_optimizer" not in ds.get("zero_optimization", {})  # dropped on the CPU
    assert "auto" not in json.dumps(ds)

    # Every evaluated record is scored against its subject_label, whatever its answer style.
    predictions = [
        json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()
    ]
    test_keys = set(forms.splits["test"])
    expected = len(test_keys) * (1 + 2 + 2)  # a T1 record and two comparisons of each style
    assert len(predictions) == expected
    for p in predictions:
        subject = next(s for s in test_keys if p["task_id"].startswith(s))
        assert p["label"] == forms.labels[subject], p
        assert p["label_source"] == "metadata.subject_label", p
    # The comparison task answers in sentences in one file: scored by the likelihood choice.
    sentences = [p for p in predictions if "sex_comparison" in p["task_id"]]
    assert {p["method"] for p in sentences} == {"likelihood"}
    evals = {r["task"]: r for r in records if r["split"] == "eval"}
    assert all(r.get("accuracy") is not None for t, r in evals.items() if t != "all"), evals
