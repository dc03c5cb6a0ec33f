"""The model against an independent, plainly written mae_st forward (`reference_code`: separate
q/k/v, explicit softmax, Conv3d, mae_st's exact op sequence) on a raw mae_st-layout state dict.

The reference takes clips, as mae_st does; vctmae's model takes the int16 crops those clips come
from and per-sample frame indices, so the clips are gathered by a plain loop (`crop_clip`).
"""

from __future__ import annotations

import math

import pytest
import torch
from reference_code import (
    SMALL,
    crop_clip,
    mae_st_state,
    random_crops,
    random_frames,
    reference_classifier,
    reference_mae,
)

from vctmae.data.frames import offset_frames
from vctmae.model import build_classifier, build_mae, load_mae_st

# ----------------------------------------------------------------------------------------------
# Inputs: int16 crops, frame indices, and the clip they select (written out plainly)


# ----------------------------------------------------------------------------------------------
# mae_st-layout state dicts with random, non-trivial values


# ----------------------------------------------------------------------------------------------
# The reference forward, op for op as mae_st's models_mae / models_vit / util.video_vit


# ----------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize(
    ("decoder_layout", "decoder_cls"), [("separable", True), ("full", False), ("full", True)]
)
def test_mae_matches_reference_mae_st_forward(decoder_layout, decoder_cls):
    state = mae_st_state(decoder_layout=decoder_layout, decoder_cls=decoder_cls, seed=1)
    model = build_mae("tiny", decoder_cls=decoder_cls, **SMALL).eval()
    report = load_mae_st(state, model)
    assert report.missing == [] and report.unexpected == [] and report.cropped == []
    gen = torch.Generator().manual_seed(2)
    crops, frames = random_crops(2, seed=2), random_frames(2, seed=2)
    # mae_st's input: the grey clip replicated to RGB.
    imgs = crop_clip(crops, frames).repeat(1, 3, 1, 1, 1)
    noise = torch.rand(2, 288, generator=gen)
    ref_loss, ref_pred, ref_mask = reference_mae(
        state, imgs, noise, heads=4, decoder_heads=2, depth=2, decoder_depth=2
    )
    with torch.no_grad():
        loss, pred, mask = model(crops, frames, mask_ratio=0.8, noise=noise)
    torch.testing.assert_close(mask, ref_mask)
    torch.testing.assert_close(pred, ref_pred, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert ref_loss > 0.01  # a non-trivial comparison


def test_classifier_matches_reference_mae_st_forward():
    state = mae_st_state(seed=3)
    gen = torch.Generator().manual_seed(4)
    state["head.weight"] = torch.randn(2, 32, generator=gen) * 0.3
    state["head.bias"] = torch.randn(2, generator=gen) * 0.1
    model = build_classifier("tiny", num_classes=2, **SMALL).eval()
    report = load_mae_st(state, model)
    assert report.missing == []
    assert "mask_token" in report.unexpected and "decoder_pred.weight" in report.unexpected
    crops = random_crops(3, seed=4)
    frames = offset_frames(torch.tensor([0, 3, 5]))
    imgs = crop_clip(crops, frames).repeat(1, 3, 1, 1, 1)  # (3, 3, 16, 96, 96)
    expected = reference_classifier(state, imgs, heads=4, depth=2)
    with torch.no_grad():
        logits = model(crops, frames)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    assert math.isfinite(float(logits.abs().sum()))
