"""Fixtures of the equivalence harness: one T1 + rsfMRI cohort, then every case on 1 and 2 ranks.

The two launches (reference and 2 ranks) run once per session and serve every test in this
folder; each launch runs all cases of `cases.CASES` in one process group (driver.py), and the
comparison cases of test_comparisons.py after them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.net import free_port

from .cases import (
    CASES,
    EVAL_FILES,
    HARNESS_ADAM_EPS,
    ONE_RANK_COMPARISONS,
    TWO_RANK_COMPARISONS,
    Case,
    ds_json,
)

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DRIVER = Path(__file__).resolve().parent / "driver.py"
LAUNCH_TIMEOUT_S = 1200


def _odd_subset(src: Path, dst: Path, n: int = 3) -> None:
    lines = src.read_text().splitlines()[:n]
    assert len(lines) == n, f"{src} has fewer than {n} tasks"
    dst.write_text("\n".join(lines) + "\n")


def _cross_modal_t3(src: Path, dst: Path) -> None:
    """The synthetic T3 comparisons with the reference scan's T1 replaced by its rsfMRI."""
    out = []
    for line in src.read_text().splitlines():
        task = json.loads(line)
        ref = task["subject_ids"][0]
        path = f"rsfmri_frames/img/{ref}"
        task["modalities"] = ["rsfMRI", "sMRI"]
        task["images"][0] = {"path": path, "token": "<image>", "modality": "rsfMRI"}
        first = task["conversations"][0]["content"]
        first[0] = {"type": "image", "modality": "rsfMRI", "image_path": path}
        out.append(json.dumps(task))
    dst.write_text("\n".join(out) + "\n")


# The predecessor's sentence answers (its UMBRELLA/sample_data styles): {y} the subject's label,
# {r} the reference's; "same" and "different" comparisons answer differently.
SENTENCES = {
    True: [
        "This scan likely belongs to a {y} subject. Key features align with the reference {r} "
        "scan in terms of overall brain volume.",
        "Classification: {Y}. The structural features show consistency with {y} neuroanatomy.",
    ],
    False: [
        "This scan likely belongs to a {y} subject. Unlike the reference {r} scan, this shows "
        "structural characteristics typical of {y} neuroanatomy.",
        "Based on comparison with the {r} reference scan, this appears to be a {y} subject.",
    ],
}


def _sentence_t3(src: Path, dst: Path, extra: int = 0) -> None:
    """The synthetic T3 comparisons answered in sentences (truth in metadata.subject_label);
    ``extra`` more records pair a query with another record's reference."""
    tasks = [json.loads(line) for line in src.read_text().splitlines()]
    for k in range(extra):
        t = json.loads(json.dumps(tasks[k]))
        query, ref = t["subject_ids"][1], t["subject_ids"][0]
        donor = next(d for d in tasks if d["subject_ids"][0] not in (query, ref))
        t["task_id"] += f"_extra{k}"
        t["subject_ids"][0] = donor["subject_ids"][0]
        t["images"][0] = donor["images"][0]
        t["conversations"][0] = donor["conversations"][0]
        t["metadata"]["reference_id"] = donor["metadata"]["reference_id"]
        t["metadata"]["reference_label"] = donor["metadata"]["reference_label"]
        tasks.append(t)
    for i, t in enumerate(tasks):
        y, r = t["metadata"]["subject_label"], t["metadata"]["reference_label"]
        style = SENTENCES[y == r][i % 2]
        answer = style.format(y=y, r=r, Y=y.capitalize())
        t["conversations"][-1]["content"] = [{"type": "text", "text": answer}]
    dst.write_text("".join(json.dumps(t) + "\n" for t in tasks))


@pytest.fixture(scope="session")
def equivalence_data(packed_cohort, tmp_path_factory) -> Path:
    """The T1 + rsfMRI cohort (20 subjects) with the instruction files and DeepSpeed configs of
    the cases beside a link to its shards."""
    cohort = packed_cohort(20, 1, 32, ("T1", "rsfMRI"), t1_shape=40)
    raw = cohort / "raw"
    root = tmp_path_factory.mktemp("equivalence-data")
    (root / "shards").symlink_to(cohort / "shards", target_is_directory=True)
    inst = root / "instructions"
    inst.mkdir()
    for name in ("t1_sex_train.jsonl", "rsfmri_sex_train.jsonl"):
        (inst / name).write_text((raw / "instructions" / name).read_text())
    _cross_modal_t3(raw / "instructions" / "t3_sex_train.jsonl", inst / "t3_cross_train.jsonl")
    for name in EVAL_FILES:
        _odd_subset(raw / "instructions" / name.replace("_odd", ""), inst / name)
    _odd_subset(raw / "instructions" / "t1_sex_eval.jsonl", inst / "t1_sex_eval_one.jsonl", 1)
    _sentence_t3(raw / "instructions" / "t3_sex_train.jsonl", inst / "t3_sentences_train.jsonl")
    _sentence_t3(raw / "instructions" / "t3_sex_eval.jsonl", inst / "t3_sentences_eval.jsonl", 1)
    for zero in ("zero1", "zero2", "zero3"):
        ds = json.loads((REPO / "ds_configs" / f"{zero}.json").read_text())
        ds["optimizer"]["params"]["eps"] = HARNESS_ADAM_EPS
        if zero == "zero3":
            ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        (root / ds_json(zero)).write_text(json.dumps(ds, indent=1))
    return root


def _launch(nproc: int, data: Path, out: Path, cases: list[Case]) -> Path:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [
        str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()),
        str(DRIVER), "--data", str(data), "--out", str(out), *(c.name for c in cases),
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, cwd=REPO
    )
    assert proc.returncode == 0, (
        f"{nproc}-rank equivalence launch exited {proc.returncode}\n"
        f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    )
    return out


@pytest.fixture(scope="session")
def reference_runs(equivalence_data, tmp_path_factory) -> Path:
    """Every case on one rank: the single-process reference with the same global batch; then, in
    the same launch, the 1-rank comparison cases (cases.ONE_RANK_COMPARISONS)."""
    out = tmp_path_factory.mktemp("equivalence-1rank")
    return _launch(1, equivalence_data, out, [*CASES, *ONE_RANK_COMPARISONS])


@pytest.fixture(scope="session")
def two_rank_runs(equivalence_data, reference_runs, tmp_path_factory) -> Path:
    """Every case on two ranks (after the reference: the two launches never share the cores); then,
    in the same launch, the 2-rank comparison cases (cases.TWO_RANK_COMPARISONS)."""
    out = tmp_path_factory.mktemp("equivalence-2rank")
    return _launch(2, equivalence_data, out, [*CASES, *TWO_RANK_COMPARISONS])
