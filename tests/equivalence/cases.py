"""The equivalence matrix: each case is one line, run on 1 rank (the reference) and on 2 ranks.

A case is correct when the 2-rank run equals the 1-rank run with the same global batch: fp32,
losses at every step, the trained patch embedding's update at the end, and the end-of-run
evaluation (an odd number of items per task, so ranks hold different counts) within the measured
bounds of TOLERANCE. The covering design keeps CI time sane: every value of every axis appears in a
case where ranks hold different modalities (`mixed`: T1 and rsfMRI tasks in one data.train at
micro-batch 1; `t3_cross`: T3 comparisons whose two images are of different modalities, mixed
with single-image T1 tasks, so image counts differ between ranks too).

To add the combination a user reports, add one line to CASES.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

STEPS = 6
GLOBAL_BATCH = 4  # micro-batch 1: 2 micro-batches per rank on 2 ranks, 4 on the reference
T1 = {"size": [32, 32, 32], "patch": [8, 8, 8]}
RSFMRI = {"size": [16, 16, 16, 4], "patch": [8, 8, 8, 2]}
# the predecessor's kind of patch (10^3 on 96^3): floor(size / patch) per axis, the rest unseen
FLOOR_PATCHES = {"T1": [10, 10, 10], "rsfMRI": [6, 6, 6, 3]}


@dataclass(frozen=True)
class Tolerance:
    """Relative bounds of one case's 2-rank run against its 1-rank reference (see TOLERANCE)."""

    loss: float  # every step's training loss
    update: float  # each trained tensor's update end - start (test_equivalence._update_errors)
    eval: float  # each task's end-of-run evaluation loss


# The bounds: 10x the largest 2-rank vs 1-rank difference measured over every case of CASES under
# ATEN_CPU_CAPABILITY=default (no SIMD), avx2 and avx512 on one AMD EPYC with AVX-512
# (2026-12-07, tests/equivalence as of this commit; one process pair per capability):
#                      default   avx2     avx512   largest case
#   loss (any step)    4.8e-6    1.5e-5   1.0e-5   t3cross-zero3-siglip (avx2)
#   update (a tensor)  1.0e-4    1.9e-4   1.6e-4   t3cross-zero2-clip-ckpt, proj.T1.bias (avx2)
#   eval loss          2.9e-5    2.0e-5   2.4e-5   t1-zero2-siglip (default)
# The difference is fixed per machine and capability, not random run to run: avx512 gave the
# figures another 2-core VM failed on every time under the old bound (weights 1.21e-5 relative to
# |w|, loss 4.1e-6). Per case it varies up to 30x between capabilities, hence the 10x margin over
# the largest of the 33. For scale, the same 1-rank run under two capabilities (every kernel and
# the random init differ by an ulp) differs by up to 6.2e-4 (loss), 6.7e-3 (update) and 2.1e-3
# (eval): Adam with eps 1e-6 still amplifies ulp-level differences over 6 steps. A real bug is far
# above the bounds: the ordering bug of the last round moved the loss by 15% (750x the bound).
# Updates are compared, not weights: |update| is 6-9% of |w| here (mostly random init), so a
# bound relative to |w| was a loose bound on the update that depended on the init's scale.
TOLERANCE = Tolerance(loss=2e-4, update=2e-3, eval=3e-4)


@dataclass(frozen=True)
class Case:
    name: str
    data: str  # t1 | rsfmri | mixed | t3_cross (files written by the fixture, see TRAIN_FILES)
    zero: str  # zero1 | zero2 | zero3 (zero3: every parameter partitioned, see ds_json)
    preset: str = "tiny"  # tiny: SigLIP tower, ChatML; tiny-clip: CLIP tower; tiny-llava15: CLIP
    # tower, Llama LM and llava-1.5's USER/ASSISTANT template with a tokenizer of its own
    checkpointing: bool = False  # activation checkpointing of both towers
    patches: str = (
        "divide"  # divide | floor: patches that leave trailing voxels unseen (Conv3d floor)
    )
    num_workers: int = 0  # data.num_workers: > 0 reads through reused batch slots

    tol: Tolerance = TOLERANCE  # a case that needs other bounds says so, with its measurement
    # Run-config keys over the harness's (the comparison cases: their own run, their own bounds).
    sets: tuple[tuple[str, str], ...] = ()


CASES = [
    Case("mixed-zero2-siglip", "mixed", "zero2"),
    # Loader workers writing into reused batch slots, 2-4 micro-batches per step fetched up front.
    # Right after its SAME_BATCHES partner, before any ZeRO-3 case: a ZeRO-3 engine leaves global
    # state in the process that moves a later ZeRO-2 case's step-2 loss by ~1e-6 (measured with
    # driver.py: mixed-zero2-siglip, mixed-zero3-clip, this case), and that check is bitwise.
    Case("mixed-zero2-siglip-workers2", "mixed", "zero2", num_workers=2),
    Case("mixed-zero3-siglip-ckpt", "mixed", "zero3", checkpointing=True),
    Case("mixed-zero1-clip", "mixed", "zero1", preset="tiny-clip"),
    Case("mixed-zero3-clip", "mixed", "zero3", preset="tiny-clip"),
    Case("t3cross-zero2-clip-ckpt", "t3_cross", "zero2", preset="tiny-clip", checkpointing=True),
    Case("t3cross-zero3-siglip", "t3_cross", "zero3"),
    Case("t1-zero2-siglip", "t1", "zero2"),
    Case("rsfmri-zero3-clip", "rsfmri", "zero3", preset="tiny-clip"),
    Case("mixed-zero2-llava15", "mixed", "zero2", preset="tiny-llava15"),
    Case(
        "t3cross-zero3-llava15-ckpt", "t3_cross", "zero3", preset="tiny-llava15", checkpointing=True
    ),
    Case("mixed-zero3-siglip-floor", "mixed", "zero3", patches="floor"),
    Case("t3sentences-zero3-siglip", "t3_sentences", "zero3"),
]
# Comparisons of runs of one launch with each other (not 2 ranks against 1): the cases of
# test_comparisons.py, each with its own bounds there. They run after every case of CASES in the
# same launch, so the cases above keep their order and neighbours (see the ZeRO-3 note above);
# a ZeRO-3 case before them moves a ZeRO-2 loss by ~1e-6, on both runs of a pair alike.
# Gradient accumulation equals one large batch on the real engine, 1 rank: micro-batch 1 x
# accumulation 4 against micro-batch 4 x accumulation 1; T1 tasks, ds_configs/zero2.json as shipped
# (Adam eps 1e-8, the setting the bounds were measured in), demo.yaml's lr, 3 steps, no eval.
ACCUMULATION_STEPS = 3
_ACCUMULATION = (
    ("train.deepspeed", "zero2"),
    ("train.max_steps", str(ACCUMULATION_STEPS)),
    ("train.lr", "3.0e-3"),
    ("train.warmup_steps", "3"),
    ("eval.at_end", "false"),
)
ACCUMULATION = {
    micro: Case(f"accumulation-micro{micro}", "t1", "zero2",
                sets=(*_ACCUMULATION, ("train.micro_batch", str(micro))))
    for micro in (1, 4)
}  # fmt: skip
ONE_RANK_COMPARISONS = list(ACCUMULATION.values())

# train.compile=blocks against eager on 2 ranks (tests/equivalence/test_comparisons.py): ZeRO-2 in
# bf16 without activation checkpointing, ZeRO-3 in fp32 with it, so two pairs cover both stages,
# both precisions and checkpointing on/off (UMBRELLA_COMPILE_ALL=1: all eight combinations).
# T1 tasks, ds_configs/ as shipped, 3 steps at a small lr (bf16 rounding differences are not
# amplified into diverging trajectories), no eval. The driver resets dynamo before each (a fresh
# process's compile, as a user's run) and keeps each run's log (OUT/CASE/log-rank*.txt).
COMPILE_STEPS = 3
COMPILE_PAIRS = [("zero2", True, False), ("zero3", False, True)]  # (stage, bf16, checkpointing)
if os.environ.get("UMBRELLA_COMPILE_ALL") == "1":
    COMPILE_PAIRS = [
        (s, b, c) for s in ("zero2", "zero3") for b in (False, True) for c in (False, True)
    ]


def compile_case(stage: str, bf16: bool, ckpt: bool, compile_: str) -> Case:
    """One run of a compiled-vs-eager pair; ``compile_`` is train.compile (none | blocks)."""
    name = f"compile-{stage}-{'bf16' if bf16 else 'fp32'}{'-ckpt' if ckpt else ''}-{compile_}"
    sets = (
        ("train.deepspeed", stage), ("train.max_steps", str(COMPILE_STEPS)),
        ("train.micro_batch", "2"), ("train.lr", "1e-4"), ("train.min_lr", "0.0"),
        ("train.warmup_steps", "3"), ("train.bf16", str(bf16).lower()),
        ("train.compile", compile_), ("eval.at_end", "false"),
    )  # fmt: skip
    return Case(name, "t1", stage, checkpointing=ckpt, sets=sets)


# Eager runs first, then the compiled ones: compiling leaves process-wide settings behind
# (inductor's vector width, DeepSpeed's NVTX switch) that no eager run should follow.
TWO_RANK_COMPARISONS = [
    compile_case(*pair, compile_) for compile_ in ("none", "blocks") for pair in COMPILE_PAIRS
]

# A case whose batches must equal another's bit for bit (it differs only in how they are read).
SAME_BATCHES = {"mixed-zero2-siglip-workers2": "mixed-zero2-siglip"}

# instruction files under the fixture's instructions/ folder (written by conftest.py)
TRAIN_FILES = {
    "t1": ["t1_sex_train.jsonl"],
    "rsfmri": ["rsfmri_sex_train.jsonl"],
    "mixed": ["t1_sex_train.jsonl", "rsfmri_sex_train.jsonl"],
    "t3_cross": ["t3_cross_train.jsonl", "t1_sex_train.jsonl"],
    "t3_sentences": ["t3_sentences_train.jsonl", "t1_sex_train.jsonl"],
}
EVAL_FILES = ["t1_sex_eval_odd.jsonl", "rsfmri_sex_eval_odd.jsonl"]
# Data whose evaluation is another: T3 comparisons answered in sentences with the truth in
# metadata.subject_label (scored by the likelihood choice), 5 of them, so on 2 ranks at
# micro-batch 2 one rank runs 2 batches and the other 1 + a dummy, each with one forward per
# class; one T1 task (the other rank: a dummy batch). 6 records, as every case has.
EVAL_FILES_BY_DATA = {"t3_sentences": ["t1_sex_eval_one.jsonl", "t3_sentences_eval.jsonl"]}
# Settings a kind of data needs over the shared ones (two T1 images and a sentence answer need
# more than demo.yaml's 256 tokens).
DATA_SETS = {"t3_sentences": {"data.max_length": "512"}}
# Adam's eps in the harness's DeepSpeed configs (ds_configs/ has 1e-8). Adam's first steps map
# each gradient element g to about lr * g / (|g| + eps): with eps 1e-8 an element whose gradient
# cancels to ~1e-8 turns fp32 reduction-order noise (~1e-10 there) into differences of ~5e-6 in
# the weights (measured: 1.1e-5 relative on a T1-only case with no mixing at all). 1e-6 keeps the
# map smooth, so the weight check measures the distributed path, not Adam's sign function.
HARNESS_ADAM_EPS = 1e-6


def ds_json(zero: str) -> str:
    """File name, in the fixture's folder, of a stage's harness DeepSpeed config: the stage's
    ds_configs/ JSON with HARNESS_ADAM_EPS and, for ZeRO-3, a persistence threshold of 0 so every
    parameter is partitioned (the tiny presets' tensors are all under the default threshold)."""
    return f"{zero}_harness.json"


def by_name(name: str) -> Case:
    every = [*CASES, *ONE_RANK_COMPARISONS, *TWO_RANK_COMPARISONS]
    for case in every:
        if case.name == name:
            return case
    raise KeyError(f"no equivalence case {name!r} (cases: {[c.name for c in every]})")


def overrides(case: Case, data: Path, out: Path) -> list[str]:
    """The run config of one case: --set pairs over configs/demo.yaml."""
    inst = data / "instructions"
    modalities = {"T1": dict(T1), "rsfMRI": dict(RSFMRI)}
    if case.patches == "floor":
        for name, patch in FLOOR_PATCHES.items():
            modalities[name]["patch"] = patch
    sets = {
        "output_dir": str(out),
        "data.shards": str(data / "shards"),
        "data.train": "[" + ", ".join(str(inst / f) for f in TRAIN_FILES[case.data]) + "]",
        "data.eval": "["
        + ", ".join(str(inst / f) for f in EVAL_FILES_BY_DATA.get(case.data, EVAL_FILES))
        + "]",
        "data.windows": "random",
        "model.preset": case.preset,
        "model.modalities": str(modalities).replace("'", '"'),
        "model.checkpointing.vision": str(case.checkpointing).lower(),
        "model.checkpointing.language": str(case.checkpointing).lower(),
        "train.deepspeed": str(data / ds_json(case.zero)),
        "train.bf16": "false",
        "train.max_steps": str(STEPS),
        "train.global_batch": str(GLOBAL_BATCH),
        "train.micro_batch": "1",
        "train.warmup_steps": "2",
        "train.lr": "1.0e-3",
        "checkpoint.every_steps": "0",
        "checkpoint.keep_last": "1",
        "eval.at_end": "true",
        "eval.micro_batch": "2",
        "eval.max_new_tokens": "3",
        "log.every_steps": "1",
        "log.progress": "false",
        "log.tensorboard": "false",
    }
    if case.num_workers:
        sets["data.num_workers"] = str(case.num_workers)

    sets.update(DATA_SETS.get(case.data, {}))
    sets.update(case.sets)
    return [f"{k}={v}" for k, v in sets.items()]
