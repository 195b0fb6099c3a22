"""The proof of correctness: every case on 2 ranks equals its 1-rank reference (see cases.py).

What differs between the ranks in these cases, and so what a bug would show as: the modalities a
rank's micro-batch holds (checked to happen, not assumed), the number of images per sample, the
sequence lengths, and the number of evaluation items per rank (3 per task over 2 ranks).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from umbrella_ds.train.trained import trained_state

from .cases import CASES, SAME_BATCHES, STEPS, TOLERANCE, Case, by_name

pytestmark = [pytest.mark.multiproc, pytest.mark.slow, pytest.mark.timeout(2700)]


def _records(out: Path, split: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    return trained_state(out / "checkpoints" / f"step-{STEPS:07d}")


def _initial_weights(out: Path) -> dict[str, torch.Tensor]:
    """The trainable parameters as built, before the first step (written by driver.py)."""
    return torch.load(out / "initial_trainable.pt")


def _update_errors(
    start: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], run: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Per trained tensor: |update_run - update_ref| / |update_ref| (Frobenius norms), where an
    update is end - start. Why the update, not the weights: the weights are mostly their random
    init, so a bound relative to |w| is a bound on the update scaled by the init's size
    (|update| / |w| was 6-9% in these cases), which says nothing about the distributed path. A
    tensor no gradient reached (a modality absent from the case) must be untouched on both: its
    gradient is exactly zero, so is Adam's update."""
    errors = {}
    for k, w_ref in ref.items():
        d_ref, d_run = w_ref - start[k], run[k] - start[k]
        if not d_ref.any():
            assert torch.equal(run[k], w_ref), f"{k}: untrained on 1 rank, changed on 2"
            continue
        errors[k] = float((d_run - d_ref).norm() / d_ref.norm())
    assert errors, "no tensor was trained"
    return errors


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_two_ranks_equal_one(case: Case, reference_runs: Path, two_rank_runs: Path) -> None:
    ref, run = reference_runs / case.name, two_rank_runs / case.name
    ref_loss = {r["step"]: r["loss"] for r in _records(ref, "train")}
    run_loss = {r["step"]: r["loss"] for r in _records(run, "train")}
    assert sorted(ref_loss) == sorted(run_loss) == list(range(1, STEPS + 1))
    worst_loss = max(_rel(run_loss[s], ref_loss[s]) for s in ref_loss)
    w_ref, w_run = _final_weights(ref), _final_weights(run)
    start, start_run = _initial_weights(ref), _initial_weights(run)
    assert sorted(w_ref) == sorted(w_run) == sorted(start) and w_ref
    assert all(torch.equal(start[k], start_run[k]) for k in start), "different initial weights"
    update_errors = _update_errors(start, w_ref, w_run)
    worst_update = max(update_errors.values())
    ev_ref = {r["task"]: r for r in _records(ref, "eval")}
    ev_run = {r["task"]: r for r in _records(run, "eval")}
    assert sorted(ev_ref) == sorted(ev_run) and "all" in ev_ref
    worst_eval = max(_rel(ev_run[t]["loss"], ev_ref[t]["loss"]) for t in ev_ref)
    print(
        f"{case.name}: worst loss rel {worst_loss:.2e}, update rel {worst_update:.2e}, "
        f"eval loss rel {worst_eval:.2e} (bounds {case.tol})"
    )
    assert worst_loss < case.tol.loss, (ref_loss, run_loss)
    assert worst_update < case.tol.update, update_errors
    assert worst_eval < case.tol.eval, (ev_ref, ev_run)
    assert ev_run["all"]["count"] == ev_ref["all"]["count"] == 6
    # training moved: equal curves of a model that did not learn would prove less
    assert abs(ref_loss[STEPS] - ref_loss[1]) > 100 * case.tol.loss * abs(ref_loss[1])


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.data in ("mixed", "t3_cross")], ids=lambda c: c.name
)
def test_mixed_cases_put_different_batches_on_the_ranks(case: Case, two_rank_runs: Path) -> None:
    """A mixed case that happened to give both ranks the same kind of batch would prove nothing."""
    per_rank = json.loads((two_rank_runs / case.name / "modalities.json").read_text())
    assert len(per_rank) == 2 and len(per_rank[0]) == len(per_rank[1]) > 0
    differing = [i for i, (a, b) in enumerate(zip(*per_rank)) if a != b]
    assert differing, f"{case.name}: every micro-batch held the same modalities on both ranks"


# The same weights evaluated again on one process (other batches, so another reduction order):
# measured up to 1.0e-7 relative per task (t1_sex, avx512; default 7.7e-8, avx2 2.6e-8; the
# machine of cases.TOLERANCE), so 1e-6. A wrongly rebuilt base moves it by orders of magnitude.
EVAL_AGAIN_RTOL = 1e-6
ZERO3_RANDOM = "mixed-zero3-siglip-ckpt"  # a ZeRO-3 random-init run: its base is drawn partitioned


def _eval_all(out: Path) -> dict:
    return next(r for r in _records(out, "eval") if r["task"] == "all")


@pytest.mark.timeout(600)
def test_zero3_random_init_evaluates_afterwards_as_during_training(
    two_rank_runs: Path, equivalence_data: Path, tmp_path: Path
) -> None:
    """umbrella-eval rebuilds the ZeRO-3 run's base on one process (seeded init: the same values
    however the model is built; before it, a partitioned build drew 41 of 76 tensors otherwise),
    checks its recorded fingerprint, and reproduces the in-training evaluation record."""
    import subprocess
    import sys

    from .cases import EVAL_FILES

    run = two_rank_runs / ZERO3_RANDOM
    meta = json.loads((run / "checkpoints" / f"step-{STEPS:07d}" / "meta.json").read_text())
    assert (
        meta["recipe"]["base"]["init_scheme"] == "name-seeded-v1"
        and len(meta["recipe"]["base"]["weights_sha256"]) == 64
    )
    inst = [str(equivalence_data / "instructions" / f) for f in EVAL_FILES]
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "umbrella-eval"), "--checkpoint", str(run),
         "--data", str(equivalence_data / "shards"), "--instructions", *inst,
         "--out", str(tmp_path / "eval")],
        capture_output=True, text=True, timeout=500,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    after = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    after_all = next(r for r in after["records"] if r["task"] == "all")
    during = _eval_all(run)
    assert _rel(after_all["loss"], during["loss"]) < EVAL_AGAIN_RTOL, (after_all, during)


# Same preset, seed and data, ZeRO-1/2 against ZeRO-3 (partitioned construction): one base.
SAME_BASE = [
    ("mixed-zero2-siglip", "mixed-zero3-siglip-ckpt"),
    ("mixed-zero1-clip", "mixed-zero3-clip"),
]


@pytest.mark.parametrize("pair", SAME_BASE, ids=lambda p: "-vs-".join(p))
def test_zero3_and_zero2_runs_train_on_one_base(
    pair: tuple[str, str], reference_runs: Path, two_rank_runs: Path
) -> None:
    """The base hash recorded by the 1-rank and 2-rank runs of both stages is one, and so is the
    first step's fp32 loss (before any update: only the base, the patch embedding's init and the
    data decide it; TOLERANCE.loss covers the reduction order of 1 against 2 ranks)."""
    records, first = set(), []
    for runs in (reference_runs, two_rank_runs):
        for name in pair:
            meta = (runs / name / "checkpoints" / f"step-{STEPS:07d}" / "meta.json").read_text()
            base = json.loads(meta)["recipe"]["base"]
            records.add((base["weights_sha256"], base["hash_scheme"], base["init_scheme"]))
            first.append(next(r["loss"] for r in _records(runs / name, "train") if r["step"] == 1))
    assert len(records) == 1, records
    assert max(_rel(x, first[0]) for x in first) < TOLERANCE.loss, first


def test_a_rebuilt_base_that_differs_is_refused(two_rank_runs: Path, tmp_path: Path) -> None:
    """The recorded base travels with the checkpoint: export refuses a rebuild that differs,
    naming both hashes (here: the recorded hash changed, as if another base had been trained)."""
    import shutil

    from umbrella_ds.train.export import BaseMismatchError, export, load_trained

    ckpts = tmp_path / "run" / "checkpoints"
    shutil.copytree(two_rank_runs / ZERO3_RANDOM / "checkpoints", ckpts)
    step = ckpts / f"step-{STEPS:07d}"
    good = export(step, tmp_path / "export")
    load_trained(good)  # the ZeRO-3 base rebuilt on one process passes the check
    meta = json.loads((step / "meta.json").read_text())
    recorded = meta["recipe"]["base"]["weights_sha256"]
    meta["recipe"]["base"]["weights_sha256"] = "0" * 64
    (step / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(BaseMismatchError) as err:
        export(step, tmp_path / "export2")
    assert "0" * 64 in str(err.value) and recorded in str(err.value)
    assert not (tmp_path / "export2" / "export.json").exists()


@pytest.mark.parametrize("name", sorted(SAME_BATCHES))
def test_loader_workers_change_nothing(name: str, reference_runs: Path) -> None:
    """Loader workers with reused batch slots give the 1-rank reference the very same losses and
    weights as reading in the training process: the slots change how, never what, is read."""
    ref, run = reference_runs / SAME_BATCHES[name], reference_runs / name
    assert [r["loss"] for r in _records(run, "train")] == [
        r["loss"] for r in _records(ref, "train")
    ]
    w_ref, w_run = _final_weights(ref), _final_weights(run)
    assert sorted(w_ref) == sorted(w_run) and all(torch.equal(w_ref[k], w_run[k]) for k in w_ref)


SENTENCES_CASE = "t3sentences-zero3-siglip"


def _predictions(out: Path) -> dict[str, dict]:
    lines = (out / "predictions.jsonl").read_text().splitlines()
    return {r["task_id"]: r for r in map(json.loads, lines)}


def test_sentence_answers_are_scored_alike_on_zero3_ranks_holding_different_counts(
    reference_runs: Path, two_rank_runs: Path
) -> None:
    """The likelihood choice under ZeRO-3 (one forward per class, dummy batches where a rank is
    short): every record's class scores on 2 ranks equal the 1-rank run's, labels come from
    metadata.subject_label and the sentence task's primary accuracy is the choice's."""
    ref, run = (
        _predictions(reference_runs / SENTENCES_CASE),
        _predictions(two_rank_runs / SENTENCES_CASE),
    )
    assert sorted(ref) == sorted(run) and len(ref) == 6
    t3 = [k for k, r in ref.items() if r["task"] == "sex_comparison"]
    assert len(t3) == 5
    for k in t3:
        a, b = run[k], ref[k]
        assert a["method"] == b["method"] == "likelihood"
        assert a["label_source"] == "metadata.subject_label" and a["label"] == a["meta_label"]
        assert a["choice"] == b["choice"]
        for c in ("female", "male"):
            # summed log-likelihoods: the eval loss's bound (cases.TOLERANCE), measured 1.4e-5
            assert _rel(a["scores"][c], b["scores"][c]) < by_name(SENTENCES_CASE).tol.eval, (a, b)
    ev = {r["task"]: r for r in _records(two_rank_runs / SENTENCES_CASE, "eval")}
    assert ev["sex_comparison"]["primary"] == "likelihood"
    assert "generation_accuracy" in ev["sex_comparison"]
