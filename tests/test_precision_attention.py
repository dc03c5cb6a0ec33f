"""The number format inference runs in, the attention maps from the probabilities' own pass, and
where numba caches the compiled ingest loops.

The attention pictures of the batched pass are checked against those of a pass of their own,
written out here: one crop, its view's frames, the encoder's explicit attention, the same
scores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import SMALL_MODEL, eval_config, read_predictions
from reference_code import random_crops

from vctmae import clip
from vctmae.data.frames import FrameSampler
from vctmae.infer.attention import shown_views, to_frames, token_scores
from vctmae.infer.config import SpeedOptions
from vctmae.infer.device import BF16_CPU_FLAGS, cpu_flags, resolve_precision
from vctmae.infer.evaluate import run_eval
from vctmae.infer.views import assess
from vctmae.ingest import numba_cache_dir
from vctmae.model import build_classifier, encode_with_attention

CPU = torch.device("cpu")

# --------------------------------------------------------------------------------- precision


def test_auto_precision_is_bf16_where_the_cpu_computes_it_natively_and_only_for_inference():
    amd_avx2 = frozenset({"sse4_2", "avx", "avx2", "fma"})
    xeon_amx = amd_avx2 | {"avx512f", "amx_tile", "amx_bf16"}
    zen4 = amd_avx2 | {"avx512f", "avx512_bf16"}
    assert resolve_precision("auto", CPU, inference=True, flags=amd_avx2) == "fp32"
    assert resolve_precision("auto", CPU, inference=True, flags=xeon_amx) == "bf16"
    assert resolve_precision("auto", CPU, inference=True, flags=zen4) == "bf16"
    # AVX-512 without its BF16 extension emulates bf16: fp32 runs faster.
    assert resolve_precision("auto", CPU, inference=True, flags={"avx512f"}) == "fp32"
    # Training keeps fp32 on every CPU; a GPU runs bf16 either way.
    assert resolve_precision("auto", CPU, inference=False, flags=xeon_amx) == "fp32"
    for inference in (True, False):
        assert resolve_precision("auto", torch.device("cuda"), inference=inference) == "bf16"
    # A choice made on the command line stays.
    assert resolve_precision("fp32", CPU, inference=True, flags=xeon_amx) == "fp32"
    assert resolve_precision("bf16", CPU, inference=False, flags=amd_avx2) == "bf16"
    # Without given flags, this machine's own.
    native = bool(BF16_CPU_FLAGS & cpu_flags())
    assert resolve_precision("auto", CPU, inference=True) == ("bf16" if native else "fp32")


def test_bf16_and_fp32_probabilities_of_a_trained_model_agree_and_eval_says_which_ran(
    easy_data, finetuned, tmp_path
):
    # Crops the classifier has not seen.
    weights, shards = finetuned.best_path, tuple(easy_data["test"])
    probs = {}
    for precision in ("bf16", "fp32"):
        out = tmp_path / precision
        run_eval(
            eval_config(weights, shards, out, multiview=6, speed=SpeedOptions(precision=precision))
        )
        assert json.loads((out / "metrics.json").read_text())["precision"] == precision
        probs[precision] = read_predictions(out / "predictions.csv").probs
    assert len(probs["fp32"]) == 16 and probs["fp32"].std() > 0.01  # the model tells crops apart
    assert np.abs(probs["bf16"] - probs["fp32"]).max() < 0.01
    assert not np.array_equal(probs["bf16"], probs["fp32"])  # bf16 really ran


# ------------------------------------------------------------------- attention in one pass


def small_model(seed: int = 4) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_classifier("tiny", num_classes=2, **SMALL_MODEL).eval()


def boxes_of_widths(widths: list[int]) -> torch.Tensor:
    """Mask boxes (B, 6), half-open, whose sagittal extents are `widths` slices wide."""
    return torch.tensor([[48 - w // 2, 48 - w // 2 + w, 20, 70, 25, 75] for w in widths])


@torch.no_grad()
def single_crop_pictures(model, crop, box, *, frames: str, shift: int) -> dict:
    """One crop's view and its maps from a pass of their own: batch 1, fp32, plain model."""
    crops = crop[None]
    boxes = None if frames == "crop" else box[None]
    shifts = torch.tensor([shift])
    view_crops, view_frames = FrameSampler(mode=frames).view_input(crops, boxes, shifts)
    _, maps = encode_with_attention(model, view_crops, view_frames)
    scores = token_scores([layer[0] for layer in maps], model.config.grid)
    cfg = model.config
    return {
        "frames": clip.scale_hu(clip.gather_slices(view_crops, view_frames))[0],
        "maps": {name: to_frames(score, cfg.t_patch, cfg.patch) for name, score in scores.items()},
    }


@pytest.mark.parametrize(("frames", "views"), [("crop", 6), ("crop", 1), ("mask", 6)])
def test_attention_maps_from_the_probabilities_pass_equal_a_pass_of_their_own(frames, views):
    model = small_model()
    crops = random_crops(3, seed=9)
    # Mask mode: a 20-slice vertebra has one view, shift -1 (no shift 0): its first is shown.
    boxes = boxes_of_widths([60, 20, 90])
    options = dict(views=views, device=CPU, precision="fp32", frames=frames, boxes=boxes)
    with_maps = assess(model, crops, attention=True, **options)
    without = assess(model, crops, **options)
    # The shown view through the explicit attention path instead of SDPA: the same numbers up to
    # fp32 rounding of a differently ordered softmax (below 1e-7 here).
    torch.testing.assert_close(with_maps.probs, without.probs, rtol=0, atol=1e-6)
    torch.testing.assert_close(with_maps.shown_probs, without.shown_probs, rtol=0, atol=1e-6)
    assert without.maps is None
    middle = clip.middle_shift(frames)
    expected_shifts = [middle, -1, middle] if frames == "mask" else [middle] * 3
    assert with_maps.shown_shifts.tolist() == expected_shifts
    pictures = shown_views(with_maps, crops, boxes, frames=frames, model=model.config)
    for index, picture in enumerate(pictures):
        shift = expected_shifts[index]
        extent = clip.extent_from_bbox(boxes[index].tolist())
        assert picture["slices"] == tuple(clip.frame_indices(frames, shift, extent))
        own = single_crop_pictures(model, crops[index], boxes[index], frames=frames, shift=shift)
        assert torch.equal(picture["frames"], own["frames"])
        assert picture["maps"].keys() == own["maps"].keys()
        for name, heat in picture["maps"].items():
            # Maps scaled to [0, 1]; a batch of 3 and a batch of 1 round differently in fp32.
            torch.testing.assert_close(heat, own["maps"][name], rtol=0, atol=1e-5)
        # The shown view's probability is that view's own forward pass.
        view = FrameSampler(mode=frames).view_input(
            crops[index : index + 1], boxes[index : index + 1], torch.tensor([shift])
        )
        alone = torch.softmax(model(*view), -1)[0, 1]
        torch.testing.assert_close(with_maps.shown_probs[index], alone, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------- numba cache


def test_numba_cache_goes_to_a_per_user_folder_unless_numba_cache_dir_is_set(tmp_path):
    home = tmp_path / "home"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(home))
        assert numba_cache_dir({}) == home / ".cache" / "vctmae" / "numba"
    xdg = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    assert numba_cache_dir(xdg) == tmp_path / "xdg" / "vctmae" / "numba"
    own = {**xdg, "NUMBA_CACHE_DIR": str(tmp_path / "mine")}
    assert numba_cache_dir(own) == tmp_path / "mine"
    # A fresh process compiles the label pass into the per-user folder (numba imported first:
    # the folder holds all the same).
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(xdg, PYTHONPATH=os.pathsep.join(sys.path))
    code = (
        "import numba, numpy as np\n"
        "from vctmae.ingest import label_pass\n"
        "label_pass.label_stats(np.ones((2, 3, 4), np.int16), 1)\n"
    )
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)
    cached = list((tmp_path / "xdg" / "vctmae" / "numba").rglob("label_pass.*.nbi"))
    assert cached, "no numba cache index written to the per-user folder"
