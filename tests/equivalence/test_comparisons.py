"""Comparisons of two runs of one launch with each other, run by the equivalence driver (the cases
of cases.ONE_RANK_COMPARISONS and TWO_RANK_COMPARISONS, after the equivalence cases in the 1-rank
and the 2-rank launch).

Each keeps the bounds it had as a launch of its own, with their measurements.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from umbrella_ds.train.trained import trained_state

from .cases import ACCUMULATION, ACCUMULATION_STEPS, COMPILE_PAIRS, COMPILE_STEPS, compile_case

pytestmark = [pytest.mark.multiproc, pytest.mark.slow, pytest.mark.timeout(2700)]

# Gradient accumulation on the real engine over 3 steps (Adam, eps 1e-8, amplifies the gradients'
# summation noise). Bounds about 10x the largest difference measured under
# ATEN_CPU_CAPABILITY=default/avx2/avx512 (AMD EPYC, 2026-12-07, as a launch of its own on the
# 48-subject T1 cohort), so the suite holds on other x86 CPUs; the naive per-micro-batch mean the
# accumulation tests exist to catch differs by more than 1e-2
# (tests/train/test_train_accumulation.py).
# As driver cases on the 20-subject harness cohort (same machine, default capability): loss 1.7e-6
# at step 3, weights 4.6e-6 (pos_embed_T1), inside the bounds with a 20x margin.
STEP_LOSS_RTOL = 5e-5  # measured 5.3e-6 / 5.4e-6 / 1.1e-6 at step 3 (was 1e-5: a 1.9x margin)
WEIGHT_RTOL = 1e-4  # measured 2.2e-6 / 3.5e-6 / 1.7e-6 relative to |w|


def _losses(out: Path) -> dict[int, float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["split"] == "train"}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative to the whole tensor: batch shapes change summation order (fp32 noise ~1e-7)."""
    return float((a - b).norm() / b.norm())


def test_deepspeed_accumulation_matches_large_micro_batch(reference_runs: Path) -> None:
    """micro-batch 1 x accumulation 4 == micro-batch 4 x accumulation 1 through DeepSpeed."""
    outs = {micro: reference_runs / case.name for micro, case in ACCUMULATION.items()}
    a, b = _losses(outs[1]), _losses(outs[4])
    assert sorted(a) == sorted(b) == list(range(1, ACCUMULATION_STEPS + 1))
    for s in a:
        assert a[s] == pytest.approx(b[s], rel=STEP_LOSS_RTOL), f"step {s}"
    step = f"step-{ACCUMULATION_STEPS:07d}"
    wa = trained_state(outs[1] / "checkpoints" / step)
    wb = trained_state(outs[4] / "checkpoints" / step)
    print("loss rel", {s: abs(a[s] - b[s]) / abs(b[s]) for s in a})
    print("weights rel", {k: _rel_err(wa[k], wb[k]) for k in wa})
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert _rel_err(wa[k], wb[k]) < WEIGHT_RTOL, k


# train.compile=blocks against eager (cases.TWO_RANK_COMPARISONS): 10x the largest compiled-vs-eager
# difference (any step, relative to max(1, |loss|)) measured under ATEN_CPU_CAPABILITY=default /
# avx2 / avx512 on one AMD EPYC with AVX-512 (2026-12-07, the two pairs, each run a launch of its
# own on the 48-subject T1 cohort; inductor's own kernels may pick their ISA independently of
# ATEN_CPU_CAPABILITY):
#   fp32 (zero3, ckpt)  4.3e-7 / 2.0e-7 / 2.3e-7  -> 1e-4 kept (230x): the capability switch
#     did not reach inductor's generated kernels, whose vector width follows the CPU it runs on,
#     so this spread understates another CPU's; a wrong compiled graph moves the loss by > 1e-2
#   bf16 (zero2)        5.0e-3 / 3.8e-3 / 4.4e-3  -> 5e-2 (was 1e-2: only 2x over the noise)
# As driver cases on the 20-subject harness cohort, after a dynamo reset (same machine, default
# capability): fp32 1.8e-6, bf16 5.4e-3, inside both bounds (55x, 9x).
COMPILE_TOLERANCE = {False: 1e-4, True: 5e-2}


def _log(run: Path) -> str:
    return "".join(p.read_text() for p in sorted(run.glob("log-rank*.txt")))


@pytest.mark.parametrize("stage,bf16,ckpt", COMPILE_PAIRS)
def test_compiled_blocks_give_eager_losses(
    two_rank_runs: Path, stage: str, bf16: bool, ckpt: bool
) -> None:
    """Regional compilation inside the DeepSpeed engine on 2 real ranks: every transformer block of
    both towers compiled (inductor + the C++ compiler on CPU), the per-step losses of eager."""
    eager_run = two_rank_runs / compile_case(stage, bf16, ckpt, "none").name
    compiled_run = two_rank_runs / compile_case(stage, bf16, ckpt, "blocks").name
    eager, compiled = _losses(eager_run), _losses(compiled_run)
    assert sorted(eager) == sorted(compiled) == list(range(1, COMPILE_STEPS + 1))
    output = _log(compiled_run)
    # 2 vision encoder layers + 2 decoder layers in the tiny preset, all compiled
    assert "compiled 4 transformer blocks" in output
    assert "compiled 4 transformer blocks" not in _log(eager_run)  # the eager run is eager
    # a block that keeps recompiling falls back to eager silently: that is a failure here
    assert "recompile_limit" not in output, output[-5000:]
    print(f"{stage} bf16={bf16}: eager {eager}, compiled {compiled}")
    diff = max(abs(eager[s] - compiled[s]) / max(1.0, abs(eager[s])) for s in eager)
    print(f"{stage} bf16={bf16} compiled vs eager loss diff: {diff:.3e}")
    for step in eager:
        assert eager[step] is not None and compiled[step] is not None
        bound = COMPILE_TOLERANCE[bf16] * max(1.0, abs(eager[step]))
        assert abs(eager[step] - compiled[step]) <= bound, (step, eager, compiled)
    assert len(set(eager.values())) > 1  # the runs really trained (losses move)
