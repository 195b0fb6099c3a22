"""Gradient accumulation equals one large batch: micro 1 x accumulation 4 == micro 4 x accumulation 1.

The single-process test exercises the normaliser with DeepSpeed's own scaling (1/accumulation per
backward); the DeepSpeed test runs the real engine both ways on one rank.
"""

from __future__ import annotations

import pytest
import torch
from helpers.training import base_sets, check, losses_by_step, run_train

from umbrella_ds.config import load_config
from umbrella_ds.model import build_model, find_patch_embed, model_forward_loss
from umbrella_ds.train.ds_setup import loss_normaliser
from umbrella_ds.train.export import trained_state
from umbrella_ds.train.inputs import build_inputs


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative to the whole tensor: batch shapes change summation order (fp32 noise ~1e-7)."""
    return float((a - b).norm() / b.norm())


def _grads(model, micro_batches, world_size: int = 1):
    """What DeepSpeed computes on one rank: sum over micro-batches of d(loss/accumulation)."""
    model.zero_grad()
    gas = len(micro_batches)
    total_tokens = sum(b["num_loss_tokens"] for b in micro_batches)
    normaliser = loss_normaliser(total_tokens, world_size, gas)
    loss_sum = 0.0
    for b in micro_batches:
        loss, s = model_forward_loss(model, b, normaliser)
        (loss / gas).backward()
        loss_sum += float(s)
    grads = {n: p.grad.clone() for n, p in find_patch_embed(model).named_parameters()}
    return grads, loss_sum / total_tokens


def test_micro1_x_acc4_equals_micro4_x_acc1(train_data):
    cfg = load_config(None, base_sets(train_data, train_data / "unused"))
    model, tok = build_model(
        "tiny", modalities={"T1": {"size": [32] * 3, "patch": [8] * 3}}, seed=0
    )
    inputs = build_inputs(cfg.data, cfg.model, model, tok, seed=0)
    items = [inputs.train_set[(0, i)] for i in range(4)]
    counts = [inputs.collate_train([it])["num_loss_tokens"] for it in items]
    assert len(set(counts)) > 1, "need samples with different supervised counts"

    g_small, loss_small = _grads(model, [inputs.collate_train([it]) for it in items])
    g_big, loss_big = _grads(model, [inputs.collate_train(items)])
    assert loss_small == pytest.approx(loss_big, rel=1e-6)
    for k in g_big:
        assert _rel_err(g_small[k], g_big[k]) < 1e-5, k
    assert any(g.abs().sum() > 0 for g in g_big.values())

    # The naive alternative (mean per micro-batch, then mean over micro-batches) differs here,
    # so the comparison above can fail.
    model.zero_grad()
    for it in items:
        b = inputs.collate_train([it])
        (model_forward_loss(model, b, b["num_loss_tokens"])[0] / 4).backward()
    naive = {n: p.grad for n, p in find_patch_embed(model).named_parameters()}
    assert max(_rel_err(naive[k], g_big[k]) for k in g_big) > 1e-2


@pytest.mark.multiproc
@pytest.mark.timeout(400)
def test_deepspeed_accumulation_matches_large_micro_batch(train_data, tmp_path):
    outs = {}
    for micro in (1, 4):
        out = tmp_path / f"micro{micro}"
        sets = base_sets(
            train_data,
            out,
            **{
                "train.max_steps": 3,
                "train.global_batch": 4,
                "train.micro_batch": micro,
                "train.bf16": "false",
                "checkpoint.every_steps": 0,
            },
        )
        check(run_train(1, sets, timeout=180))
        outs[micro] = out
    a, b = losses_by_step(outs[1]), losses_by_step(outs[4])
    assert sorted(a) == [1, 2, 3]
    for s in a:
        assert a[s] == pytest.approx(b[s], rel=1e-5), f"step {s}"
    wa = trained_state(outs[1] / "checkpoints" / "step-0000003")
    wb = trained_state(outs[4] / "checkpoints" / "step-0000003")
    for k in wa:
        assert _rel_err(wa[k], wb[k]) < 1e-4, k  # Adam amplifies fp32 summation noise a little
