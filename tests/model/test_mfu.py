"""The MFU formula against a hand computation for the tiny presets, and the GPU peak table.

Parameter counts below are worked out from the preset JSONs by hand (not by walking modules), so
the test fails if ``flop_counter`` counts the wrong parts of the network: frozen weights need no
weight gradients, the gradient stops at the selected vision feature layer, the SigLIP pooling
head runs forward only, and the LM head runs at the K supervised positions only.
"""

from __future__ import annotations

import pytest

from umbrella_ds.model import build_model
from umbrella_ds.model.flops import FlopCounter, flop_counter
from umbrella_ds.train.run_logging import gpu_peak, mfu

H = 64  # hidden size of both towers and the LM in tiny / tiny-clip
I = 128  # noqa: E741  (intermediate size)
V = 512
HEAD_DIM, KV_HEADS = H // 2, 1

# CLIP / SigLIP encoder layer: 2 LayerNorms, q/k/v/out with bias, fc1/fc2 with bias
VISION_LAYER = 2 * (2 * H) + 4 * (H * H + H) + (H * I + I) + (I * H + H)
# LLaVA projector: linear_1 (vision H -> text H) and linear_2, with bias
PROJECTOR = 2 * (H * H + H)
KV = KV_HEADS * HEAD_DIM
# Qwen2 decoder layer: q/k/v with bias, o without; gate/up/down without; 2 RMSNorms
QWEN2_LAYER = (H * H + H) + 2 * (H * KV + KV) + H * H + 3 * H * I + 2 * H
# Llama decoder layer: no biases
LLAMA_LAYER = H * H + 2 * H * KV + H * H + 3 * H * I + 2 * H


def test_hand_counts_are_what_we_think():
    assert VISION_LAYER == 33472
    assert PROJECTOR == 8320
    assert QWEN2_LAYER == 37120
    assert LLAMA_LAYER == 36992


@pytest.mark.parametrize(
    "preset,expected",
    [
        # SigLIP, feature layer -1: both layers get the gradient; pooling head k/v forward only
        ("tiny", dict(vision_forward=2 * VISION_LAYER + PROJECTOR + 2 * H * H,
                      vision_backward=2 * VISION_LAYER + PROJECTOR, language=2 * QWEN2_LAYER,
                      layers_with_grad=2 * VISION_LAYER)),
        # CLIP, feature layer -2: the last layer runs forward but the gradient never enters it
        ("tiny-clip", dict(vision_forward=2 * VISION_LAYER + PROJECTOR,
                           vision_backward=VISION_LAYER + PROJECTOR, language=2 * LLAMA_LAYER,
                           layers_with_grad=VISION_LAYER)),
    ],
)  # fmt: skip
def test_flop_counter_matches_hand_computation(preset, expected):
    model, _ = build_model(preset, seed=0)
    fc = flop_counter(model, (False, False))
    assert fc.vision_forward == expected["vision_forward"]
    assert fc.vision_backward == expected["vision_backward"]
    assert fc.language == expected["language"]
    assert (fc.hidden, fc.vocab) == (H, V)
    assert not fc.recomputes and fc.recomputed(64, 100) == 0
    # one step: 2 T1 images of 64 tokens, 180 non-pad tokens, 5 supervised positions
    t_img, t, k = 128, 180, 5
    fwd = 2 * (expected["vision_forward"] * t_img + expected["language"] * t + H * V * k)
    bwd = 2 * (expected["vision_backward"] * t_img + expected["language"] * t + H * V * k)
    assert fc.forward(t_img, t, k) == fwd
    assert fc.backward(t_img, t, k) == bwd
    assert fc.useful(t_img, t, k) == fwd + bwd
    # checkpointing replays the checkpointed layers that the gradient passes, per tower
    both = flop_counter(model, (True, True))
    assert both.recomputes
    assert both.recomputed(t_img, t) == 2 * (
        expected["layers_with_grad"] * t_img + expected["language"] * t
    )
    only_lang = flop_counter(model, (False, True))
    assert only_lang.recomputed(t_img, t) == 2 * expected["language"] * t
    assert only_lang.useful(t_img, t, k) == fc.useful(t_img, t, k)  # recompute is not useful


def test_mfu_divides_by_time_peak_and_devices():
    fc = FlopCounter(vision_forward=10, vision_backward=8, language=20, hidden=4, vocab=8)
    useful = fc.useful(image_tokens=3, tokens=5, loss_tokens=2)
    assert useful == 2 * (30 + 100 + 64) + 2 * (24 + 100 + 64)
    assert mfu(useful, 2.0, 100.0, 2) == pytest.approx(useful / 400.0)
    assert mfu(useful, 2.0, None, 2) is None  # CPU / unknown GPU: null, never a made-up number


@pytest.mark.parametrize(
    "name,peak,label",
    [
        ("NVIDIA H100 80GB HBM3", 989e12, "H100 SXM bf16 dense"),
        ("NVIDIA H100 PCIe", 756e12, "H100 PCIe bf16 dense"),
        ("NVIDIA H100 NVL", 835e12, "H100 NVL bf16 dense"),
        ("NVIDIA H200", 989e12, "H200 bf16 dense"),
        ("NVIDIA A100-SXM4-80GB", 312e12, "A100 bf16 dense"),
        ("NVIDIA A10", 125e12, "A10 bf16 dense"),
    ],
)
def test_gpu_peak_table(name, peak, label):
    assert gpu_peak(name) == (peak, label)


def test_unknown_gpu_has_no_peak():
    assert gpu_peak("NVIDIA A10G") is None
    assert gpu_peak("Some Future GPU") is None
