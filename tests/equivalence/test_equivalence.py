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

from umbrella_ds.train.export import trained_state

from .cases import CASES, STEPS, Case

LOSS_RTOL = 1e-4
WEIGHT_RTOL = 1e-5
pytestmark = [pytest.mark.multiproc, pytest.mark.slow, pytest.mark.timeout(2700)]


def _records(out: Path, split: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    return trained_state(out / "checkpoints" / f"step-{STEPS:07d}")


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
    assert sorted(w_ref) == sorted(w_run) and w_ref
    worst_weight = max(float((w_run[k] - w_ref[k]).norm() / w_ref[k].norm()) for k in w_ref)
    ev_ref = {r["task"]: r for r in _records(ref, "eval")}
    ev_run = {r["task"]: r for r in _records(run, "eval")}
    assert sorted(ev_ref) == sorted(ev_run) and "all" in ev_ref
    worst_eval = max(_rel(ev_run[t]["loss"], ev_ref[t]["loss"]) for t in ev_ref)
    print(
        f"{case.name}: worst loss rel {worst_loss:.2e}, weights rel {worst_weight:.2e}, "
        f"eval loss rel {worst_eval:.2e}"
    )
    assert worst_loss < LOSS_RTOL, (ref_loss, run_loss)
    assert worst_weight < WEIGHT_RTOL
    assert worst_eval < LOSS_RTOL, (ev_ref, ev_run)
    assert ev_run["all"]["count"] == ev_ref["all"]["count"] == 6
    # training moved: equal curves of a model that did not learn would prove less
    assert abs(ref_loss[STEPS] - ref_loss[1]) > 100 * LOSS_RTOL * abs(ref_loss[1])


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.data in ("mixed", "t3_cross")], ids=lambda c: c.name
)
def test_mixed_cases_put_different_batches_on_the_ranks(case: Case, two_rank_runs: Path) -> None:
    """A mixed case that happened to give both ranks the same kind of batch would prove nothing."""
    per_rank = json.loads((two_rank_runs / case.name / "modalities.json").read_text())
    assert len(per_rank) == 2 and len(per_rank[0]) == len(per_rank[1]) > 0
    differing = [i for i, (a, b) in enumerate(zip(*per_rank)) if a != b]
    assert differing, f"{case.name}: every micro-batch held the same modalities on both ranks"
