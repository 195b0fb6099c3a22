"""``train.compile=blocks`` inside the DeepSpeed engine: the same losses as eager, 2 real ranks.

Regional compilation must not change the numbers: every transformer block of both towers is
compiled (inductor + the C++ compiler on CPU), and the per-step losses of a short run match the
eager run's (fp32 within 1e-4, bf16 within 5e-2, relative to max(1, |loss|); see TOLERANCE).
ZeRO-2 runs in bf16 without activation checkpointing, ZeRO-3 in fp32 with checkpointing on in both towers (HF
checkpoints each block's ``forward``, so the checkpoint runs inside the compiled block): two pairs
of runs cover both stages, both precisions and checkpointing on/off. The learning rate is small
so that bf16 rounding differences (inductor keeps fused intermediates in fp32, eager rounds every
op to bf16) are not amplified by three different updates into a diverging trajectory. UMBRELLA_COMPILE_ALL=1 runs all eight
combinations. Compiled code is cached in ``$TORCHINDUCTOR_CACHE_DIR`` (conftest) so reruns are faster.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from helpers.training import REPO, base_sets, env, losses_by_step, train_cmd

INDUCTOR_CACHE = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])  # set by conftest
STEPS = 3
CASES = [("zero2", True, False), ("zero3", False, True)]  # (stage, bf16, checkpointing)
if os.environ.get("UMBRELLA_COMPILE_ALL") == "1":
    CASES = [(s, b, c) for s in ("zero2", "zero3") for b in (False, True) for c in (False, True)]
# 10x the largest compiled-vs-eager difference (any step, relative to max(1, |loss|)) measured
# under ATEN_CPU_CAPABILITY=default / avx2 / avx512 on one AMD EPYC with AVX-512 (2026-12-07,
# the two CASES; inductor's own kernels may pick their ISA independently of ATEN_CPU_CAPABILITY):
#   fp32 (zero3, ckpt)  4.3e-7 / 2.0e-7 / 2.3e-7  -> 1e-4 kept (230x): the capability switch
#     did not reach inductor's generated kernels, whose vector width follows the CPU it runs on,
#     so this spread understates another CPU's; a wrong compiled graph moves the loss by > 1e-2
#   bf16 (zero2)        5.0e-3 / 3.8e-3 / 4.4e-3  -> 5e-2 (was 1e-2: only 2x over the noise)
TOLERANCE = {False: 1e-4, True: 5e-2}


def _run(data: Path, out: Path, stage: str, bf16: bool, ckpt: bool, compile_: str) -> str:
    """One 2-rank run in its own process group (killed whole on timeout); returns its output."""
    sets = base_sets(
        data,
        out,
        **{"train.max_steps": STEPS, "train.global_batch": 4, "train.micro_batch": 2,
           "train.deepspeed": stage, "train.lr": 1e-4, "train.min_lr": 0.0,
           "train.bf16": str(bf16).lower(), "train.compile": compile_,
           "model.checkpointing.vision": str(ckpt).lower(),
           "model.checkpointing.language": str(ckpt).lower(),
           "checkpoint.every_steps": 0, "checkpoint.keep_last": 1},
    )  # fmt: skip
    INDUCTOR_CACHE.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        train_cmd(2, sets, resume="none"),
        env=env(TORCHINDUCTOR_CACHE_DIR=str(INDUCTOR_CACHE)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, (
        f"{stage} bf16={bf16} ckpt={ckpt} {compile_}: exit {proc.returncode}\n{output[-5000:]}"
    )
    return output


@pytest.fixture(scope="module")
def runs(train_data, tmp_path_factory):
    """(stage, bf16, ckpt, compile) -> (losses by step, output); each run made once per module."""
    cache: dict[tuple[str, bool, bool, str], tuple[dict[int, float], str]] = {}

    def get(stage: str, bf16: bool, ckpt: bool, compile_: str):
        key = (stage, bf16, ckpt, compile_)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"compile-{stage}-{int(bf16)}-{int(ckpt)}-{compile_}")
            output = _run(train_data, out, stage, bf16, ckpt, compile_)
            cache[key] = (losses_by_step(out), output)
        return cache[key]

    return get


@pytest.mark.multiproc
@pytest.mark.timeout(900)
@pytest.mark.parametrize("stage,bf16,ckpt", CASES)
def test_compiled_blocks_give_eager_losses(runs, stage, bf16, ckpt):
    eager, _ = runs(stage, bf16, ckpt, "none")
    compiled, output = runs(stage, bf16, ckpt, "blocks")
    assert sorted(eager) == sorted(compiled) == list(range(1, STEPS + 1))
    # 2 vision encoder layers + 2 decoder layers in the tiny preset, all compiled
    assert "compiled 4 transformer blocks" in output
    # a block that keeps recompiling falls back to eager silently: that is a failure here
    assert "recompile_limit" not in output, output[-5000:]
    print(f"{stage} bf16={bf16}: eager {eager}, compiled {compiled}")
    diff = max(abs(eager[s] - compiled[s]) / max(1.0, abs(eager[s])) for s in eager)
    print(f"{stage} bf16={bf16} compiled vs eager loss diff: {diff:.3e}")
    for step in eager:
        assert eager[step] is not None and compiled[step] is not None
        assert abs(eager[step] - compiled[step]) <= TOLERANCE[bf16] * max(1.0, abs(eager[step])), (
            step,
            eager,
            compiled,
        )
    assert len(set(eager.values())) > 1  # the runs really trained (losses move)
