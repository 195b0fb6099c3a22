"""Modality branches run in one order fixed by the configuration, whatever the batch holds.

Why it matters (docs/ARCHITECTURE.md, "Modality order"): ZeRO-3 gathers a branch's parameters
when it runs and ZeRO-1/2 fill gradient buckets in hook order, so ranks that ran branches in
different orders would gather mismatched parameters or sum unrelated gradients. The equivalence
harness (tests/equivalence) proves the end-to-end result; these tests pin the rule itself, and
the predecessor's configurations that go with it (a patch that does not divide the size,
`vision_feature_layer: 0`).
"""

from __future__ import annotations

import logging

import pytest
import torch

from umbrella_ds.model import branch_order, build_model, embed_inputs, find_patch_embed

MODS = {"T1": {"size": [16, 16, 16], "patch": [8, 8, 8]},
        "rsfMRI": {"size": [8, 8, 8, 4], "patch": [4, 4, 4, 2]}}  # fmt: skip


@pytest.fixture(scope="module")
def model():
    m, _ = build_model("tiny", modalities=MODS, seed=0)
    return m


def _batch(model, modalities: list[str]):
    """One sample per listed modality, in that order: images dict keyed in the batch's order."""
    patch = find_patch_embed(model)
    image_id = int(model.config.image_token_id)
    ids, images, positions, offset = [], {}, {}, 0
    for m in modalities:
        n = patch.num_tokens(m)
        ids += [5] * 3 + [image_id] * n
        positions.setdefault(m, []).extend(range(offset + 3, offset + 3 + n))
        images[m] = torch.randn(1, *patch.specs[m].size)
        offset += 3 + n
    ids += [6]
    return (
        torch.tensor([ids]),
        images,
        {m: torch.tensor(p) for m, p in positions.items()},
    )


def _forward_order(model, modalities: list[str]) -> list[str]:
    """The branch of the patch embedding each tower call ran, in call order."""
    patch = find_patch_embed(model)
    calls: list[str] = []
    hooks = [
        proj.register_forward_hook(lambda mod, inp, out, name=name: calls.append(name))
        for name, proj in patch.proj.items()
    ]
    try:
        ids, images, positions = _batch(model, modalities)
        embed_inputs(model, ids, images, positions, all_modalities=("T1", "rsfMRI"))
    finally:
        for h in hooks:
            h.remove()
    return calls


@pytest.mark.parametrize("batch", [["T1"], ["rsfMRI"], ["rsfMRI", "T1"], ["T1", "rsfMRI"], []])
def test_branches_run_in_configured_order(model, batch):
    assert _forward_order(model, batch) == ["T1", "rsfMRI"]


def test_branch_order_ignores_the_batchs_order(model):
    assert branch_order(model, ["rsfMRI", "T1"]) == ["T1", "rsfMRI"]
    assert branch_order(model, ["rsfMRI"], ["T1"]) == ["T1", "rsfMRI"]
    assert branch_order(model, ["rsfMRI"]) == ["rsfMRI"]
    with pytest.raises(ValueError, match="not configured"):
        branch_order(model, ["T2"])


def test_reordered_images_give_the_same_embeddings(model):
    ids, images, positions = _batch(model, ["rsfMRI", "T1"])
    flipped = dict(reversed(list(images.items())))
    a = embed_inputs(model, ids, images, positions)
    b = embed_inputs(model, ids, flipped, positions)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_predecessor_patch_10_on_96_floors_to_729_tokens(caplog):
    """The predecessor's T1 configs: patch 10^3 on a 96^3 grid, Conv3d floor (9 per axis)."""
    mods = {"T1": {"size": [96, 96, 96], "patch": [10, 10, 10]}}
    with caplog.at_level(logging.INFO, logger="umbrella_ds.model.build"):
        m, _ = build_model("tiny", modalities=mods, seed=0)
    patch = find_patch_embed(m)
    assert patch.num_tokens("T1") == 729
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("trailing [6, 6, 6] voxels per axis are unseen" in w for w in warnings), warnings
    assert any("T1 96x96x96 / 10x10x10: 729 image tokens" in r.getMessage() for r in caplog.records)
    out = patch(torch.randn(2, 96, 96, 96), modality="T1")
    assert out.shape == (2, 729, patch.embed_dim)
    # the unseen trailing voxels really are unseen
    x = torch.randn(1, 96, 96, 96)
    y = x.clone()
    y[:, 90:, :, :] = 7.0
    torch.testing.assert_close(patch(x, modality="T1"), patch(y, modality="T1"))


def test_series_patch_that_does_not_divide_floors_too():
    m, _ = build_model(
        "tiny", modalities={"rsfMRI": {"size": [9, 8, 8, 5], "patch": [4, 4, 4, 2]}}, seed=0
    )
    patch = find_patch_embed(m)
    assert patch.num_tokens("rsfMRI") == 2 * 2 * 2 * 2
    x = torch.randn(1, 9, 8, 8, 5)
    y = x.clone()
    y[:, 8:] = 3.0
    y[..., 4:] = 3.0
    torch.testing.assert_close(patch(x, modality="rsfMRI"), patch(y, modality="rsfMRI"))


def test_vision_feature_layer_zero_is_the_embedding_output(model):
    m, _ = build_model("tiny", modalities=MODS, seed=0)
    m.config.vision_feature_layer = 0
    ids, images, positions = _batch(m, ["T1"])
    out = embed_inputs(m, ids, images, positions)
    patch = find_patch_embed(m)
    from umbrella_ds.model import projector, vision_tower

    with patch.use_modality("T1"):
        hidden0 = vision_tower(m)(images["T1"], output_hidden_states=True).hidden_states[0]
    expected = projector(m)(hidden0)[0]
    torch.testing.assert_close(out[0, positions["T1"]], expected)
