"""Using what was trained: umbrella-eval reproduces the in-training evaluation, umbrella-infer on a
raw NIfTI answers as evaluation on the packed subject, keep_best survives keep_last, provenance in
every kind of output, and the leakage guard.

One session-scoped 2-rank run (bf16, evaluation and a checkpoint every step, keep_last 1) serves
all of them; its export is shared too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.net import free_port
from helpers.training import BIN, REPO, base_sets, check, env, metrics, run_train

pytestmark = pytest.mark.multiproc

STEPS = 3


@pytest.fixture(scope="session")
def eval_run(train_data, tmp_path_factory) -> Path:
    """2 ranks, bf16, eval + checkpoint every step, keep_last 1, keep_best on a constant metric.

    ``count`` is equal at every evaluation, and a tie never replaces the best, so step 1 stays
    the best checkpoint: keep_last=1 must still not delete it.
    """
    out = tmp_path_factory.getbasetemp() / "eval-run"
    sets = base_sets(
        train_data,
        out,
        **{"train.max_steps": STEPS, "checkpoint.every_steps": 1, "checkpoint.keep_last": 1,
           "checkpoint.keep_best": "count", "eval.every_steps": 1, "eval.max_new_tokens": 3},
    )  # fmt: skip
    check(run_train(2, sets, timeout=400))
    return out


@pytest.fixture(scope="session")
def exported(eval_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.getbasetemp() / "eval-export"
    proc = subprocess.run(
        [BIN / "umbrella-export", eval_run, "--out", out],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    return out


def last_eval_records(run: Path) -> list[dict]:
    ev = metrics(run, "eval")
    last = max(r["step"] for r in ev)
    return [r for r in ev if r["step"] == last]


def eval_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "umbrella_ds.eval.eval_cli", *map(str, args)]


@pytest.mark.timeout(600)
def test_keep_best_survives_keep_last_and_train_provenance(eval_run):
    ckpts = eval_run / "checkpoints"
    best = json.loads((ckpts / "best.json").read_text())
    assert best["tag"] == "step-0000001" and best["metric"] == "count"
    latest = (ckpts / "latest").read_text().strip()
    assert latest == f"step-{STEPS:07d}"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-0000001", latest]
    assert (ckpts / "step-0000001" / "meta.json").is_file()

    prov = json.loads((eval_run / "provenance.json").read_text())
    assert prov["kind"] == "train"
    assert [r["rank"] for r in prov["ranks"]] == [0, 1] and all(r["host"] for r in prov["ranks"])
    assert prov["config"]["train"]["max_steps"] == STEPS
    assert set(prov["inputs"]) >= {"config", "model", "data"}
    assert prov["versions"]["deepspeed"] and prov["versions"]["torch"]


@pytest.mark.timeout(600)
def test_umbrella_eval_reproduces_the_in_training_record(eval_run, train_data, tmp_path):
    out = tmp_path / "eval"
    inst = train_data / "raw" / "instructions" / "t1_sex_eval.jsonl"
    # Two ranks through torchrun (the launcher discovery of train/env.py), as training ran.
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()), "-m", "umbrella_ds.eval.eval_cli",
        "--checkpoint", str(eval_run), "--data", str(train_data / "shards"),
        "--instructions", str(inst), "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=400, cwd=REPO)
    check(proc)
    result = json.loads((out / "metrics.json").read_text())
    assert result["source"]["step"] == STEPS and result["world_size"] == 2
    assert result["records"] == last_eval_records(eval_run)
    task = next(r for r in result["records"] if r["task"] == "t1_sex")
    assert {"accuracy", "balanced_accuracy", "auroc", "ci95", "unparseable", "count"} <= set(task)
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert preds == [
        json.loads(x) for x in (eval_run / "predictions.jsonl").read_text().splitlines()
    ]
    assert len(preds) == task["count"] and all("class_probs" in p for p in preds)
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["kind"] == "eval" and [r["rank"] for r in prov["ranks"]] == [0, 1]
    assert set(prov["inputs"]) == {"checkpoint", "shards_index", "data"}


@pytest.mark.timeout(600)
def test_export_carries_what_inference_needs_and_evaluates_the_same(
    eval_run,
    exported,
    train_data,
    tmp_path,
):
    info = json.loads((exported / "export.json").read_text())
    shards = json.loads((train_data / "shards" / "index.json").read_text())
    assert info["preprocessing"] == shards["preprocessing"]
    base = info["recipe"]["base"]
    assert len(base["weights_sha256"]) == 64 and base["preset"] == "tiny"
    prov = json.loads((exported / "provenance.json").read_text())
    assert prov["kind"] == "export" and prov["extra"]["step"] == STEPS

    out = tmp_path / "eval-export"
    inst = train_data / "raw" / "instructions" / "t1_sex_eval.jsonl"
    proc = subprocess.run(
        eval_cmd("--checkpoint", exported, "--data", train_data / "shards", "--instructions", inst,
                 "--out", out, "--micro-batch", "5"),
        env=env(), capture_output=True, text=True, timeout=400, cwd=REPO,
    )  # fmt: skip
    check(proc)
    got = {r["task"]: r for r in json.loads((out / "metrics.json").read_text())["records"]}
    want = {r["task"]: r for r in last_eval_records(eval_run)}
    # One rank with batches of 5 = each training rank's 5 items: the same numbers.
    for key in ("accuracy", "balanced_accuracy", "count", "unparseable"):
        assert got["t1_sex"][key] == want["t1_sex"][key], key
    print(f"auroc abs diff: {abs(got['t1_sex']['auroc'] - want['t1_sex']['auroc']):.3e}")
    # Exact by construction, no tolerance: AUROC is rank-based (stats.auroc), a multiple of
    # 1 / (2 n_pos n_neg) computed from integer and half-integer rank sums, so it moves only if two
    # subjects' scores swap order, and then by a whole step. Measured 0 under
    # ATEN_CPU_CAPABILITY=default, avx2 and avx512 (AMD EPYC with AVX-512, 2026-12-07).
    assert got["t1_sex"]["auroc"] == want["t1_sex"]["auroc"]


@pytest.mark.timeout(300)
def test_a_checkpoint_and_its_export_carry_one_recipe_and_load_alike(eval_run, exported):
    """meta.json and export.json hold the same ModelRecipe (same key, same dict), and the one
    loader takes the run, the step and the export to the same model and recipe."""
    import torch

    from umbrella_ds.model import find_patch_embed
    from umbrella_ds.train import trained

    info = json.loads((exported / "export.json").read_text())
    step_dir = Path(info["checkpoint"])
    meta = json.loads((step_dir / "meta.json").read_text())
    assert meta["recipe"] == info["recipe"] and info["recipe"]["template"] == "chatml"
    assert (meta["format"], info["format"]) == (2, 3)
    assert not {"base", "init", "seed", "modalities"} & (set(info) | set(meta))
    loaded = {
        "run": trained.load(eval_run),
        "step": trained.load(step_dir),
        "export": trained.load(exported),
    }
    assert all(recipe.to_dict() == info["recipe"] for _, _, recipe in loaded.values())
    want = find_patch_embed(loaded["export"][0]).state_dict()
    for what in ("run", "step"):
        got = find_patch_embed(loaded[what][0]).state_dict()
        assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.timeout(600)
def test_infer_on_a_raw_nifti_answers_as_evaluation_on_the_packed_subject(
    eval_run,
    exported,
    train_data,
    tmp_path,
):
    raw = train_data / "raw"
    tasks = [
        json.loads(x) for x in (raw / "instructions" / "t1_sex_eval.jsonl").read_text().splitlines()
    ]
    preds = {
        p["task_id"]: p
        for p in map(json.loads, (eval_run / "predictions.jsonl").read_text().splitlines())
    }
    task = tasks[0]
    prompt = task["conversations"][0]["content"][1]["text"]
    nifti = raw / task["images"][0]["path"]
    assert nifti.is_file()
    out = tmp_path / "answer.json"
    proc = subprocess.run(
        [sys.executable, "-m", "umbrella_ds.infer", "--model", str(exported), "--prompt", prompt,
         "--scan", f"T1={nifti}", "--out", str(out)],
        env=env(), capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    check(proc)
    answer = json.loads(out.read_text())["answer"]
    assert proc.stdout.strip() == answer == preds[task["task_id"]]["answer"]

    # A base model that is not the one trained on is refused, naming both hashes.
    info = json.loads((exported / "export.json").read_text())
    bad = tmp_path / "bad-export"
    subprocess.run(["cp", "-r", str(exported), str(bad)], check=True, timeout=60)
    info["recipe"]["base"]["weights_sha256"] = "0" * 64
    (bad / "export.json").write_text(json.dumps(info))

    def infer_bad() -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "umbrella_ds.infer", "--model", str(bad), "--prompt", prompt,
             "--scan", f"T1={nifti}"],
            env=env(), capture_output=True, text=True, timeout=300, cwd=REPO,
        )  # fmt: skip

    proc = infer_bad()
    assert proc.returncode == 2 and "base model mismatch" in proc.stderr and "0" * 64 in proc.stderr
    # Preprocessing that does not fit the model's input grid is refused.
    info = json.loads((exported / "export.json").read_text())
    info["preprocessing"]["T1"]["size"] = [16, 16, 16]
    (bad / "export.json").write_text(json.dumps(info))
    proc = infer_bad()
    assert proc.returncode == 2 and "preprocessing mismatch" in proc.stderr


@pytest.mark.timeout(300)
def test_training_refuses_overlapping_subjects_naming_them(train_data, tmp_path):
    inst = train_data / "raw" / "instructions"
    train_file = inst / "t1_sex_train.jsonl"
    first = json.loads(train_file.read_text().splitlines()[0])
    leaked = tmp_path / "eval_with_leak.jsonl"
    leaked.write_text((inst / "t1_sex_eval.jsonl").read_text() + json.dumps(first) + "\n")
    sets = base_sets(train_data, tmp_path / "out", **{"train.max_steps": 1})
    sets = [s for s in sets if not s.startswith("data.eval=")] + [f"data.eval=[{leaked}]"]
    cmd = [sys.executable, "-m", "umbrella_ds.train", "--config", str(REPO / "configs" / "demo.yaml"),
           "--set", *sets]  # fmt: skip
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr  # a user error: one line
    subject = first["subject_ids"][0]
    assert "1 subject(s) are in both the training and the evaluation set" in proc.stderr
    assert subject in proc.stderr and "data.allow_overlap" in proc.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_leakage_guard_counts_t3_reference_scans():
    from umbrella_ds.data import parse_task
    from umbrella_ds.eval.leakage import LeakageError, check_no_overlap, shared_subjects

    def t3(ref: str, query: str):
        conv = [
            {"role": "user", "content": [{"type": "image", "modality": "sMRI", "image_path": f"{ref}.nii.gz"}, {"type": "text", "text": "ref"}]},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "image", "modality": "sMRI", "image_path": f"{query}.nii.gz"}, {"type": "text", "text": "q"}]},
            {"role": "assistant", "content": "male."},
        ]  # fmt: skip
        return parse_task(
            {"task_id": f"t3_{ref}_{query}", "subject_ids": [ref, query], "conversations": conv},
            "x",
        )

    train = [t3("A", "B"), t3("C", "D")]
    evaluation = [t3("E", "F"), t3("D", "G")]  # D is a training *query*, here a reference
    assert list(shared_subjects(train, evaluation)) == ["D"]
    with pytest.raises(LeakageError, match=r"1 subject\(s\).*D \(train: t3_C_D; eval: t3_D_G\)"):
        check_no_overlap(train, evaluation, allow=False)
    assert list(check_no_overlap(train, evaluation, allow=True)) == ["D"]
    assert check_no_overlap(train, [t3("E", "F")], allow=False) == {}


def test_eval_cli_usage_errors(tmp_path):
    proc = subprocess.run(
        eval_cmd("--checkpoint", tmp_path, "--data", tmp_path, "--instructions", tmp_path / "x"),
        env=env(), capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 2 and "not a checkpoint" in proc.stderr


def test_class_first_tokens_are_the_tokens_greedy_decoding_must_choose_first():
    from umbrella_ds.eval.evaluate import answer_first_token, class_first_tokens, record_subject
    from umbrella_ds.model import build_model

    _, tok = build_model("tiny")
    tokens = class_first_tokens(tok, ["male.", "female.", "Male."])
    assert set(tokens) == {"female", "male"} and len(set(tokens.values())) == 2
    assert tokens["male"] == answer_first_token(tok, "male.")
    assert tok.decode([tokens["male"]]).strip().lower().startswith("m")
    assert class_first_tokens(tok, ["1.5", "-2"]) is None  # regression: no class scores
    # Two classes beginning with the same token: no per-class score (AUROC left out).
    assert answer_first_token(tok, "male.") == answer_first_token(tok, "males.")  # tiny tokenizer
    assert class_first_tokens(tok, ["male.", "males."]) is None
    item = {"metadata": {}, "subject_ids": ["REF", "QUERY"], "task_id": "t"}
    assert record_subject(item) == "QUERY"
    assert record_subject({**item, "metadata": {"subject_id": "S"}}) == "S"
