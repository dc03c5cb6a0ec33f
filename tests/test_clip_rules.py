"""The clip rules of `vctmae.clip` against independent sources.

The mask-mode rule is checked against a plain numpy transcription of the paper's
public code (lbuess/Video-CT_MAE at d27e0b2), written from reading it; the crop
rule against `vctmae.data.frames.sample_frames`; the context cut against a
numpy oracle of MONAI's CropForegroundD + ResizeWithPadOrCropD as the reference
calls them.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from reference_code import reference_context_cut, reference_frames, reference_shift_range

from vctmae import clip
from vctmae.data.frames import random_offsets, sample_frames

# ----------------------------------------------------------------------------- the reference, transcribed
#
# src/video_ct_transform.py:37-49 (SampleVideoFromVolumeD.sample_frames, training)
# and :108-129 (SampleVideoEnsembleFromVolumeD.sample_frames, evaluation), on a
# volume already cut to the mask's sagittal extent (width = its depth, :37/:108).
# Training shifts come from numpy's randint(low, high), high excluded (:48);
# the ensemble from range(low, high) (:127); both with low = -sd // 2 in Python
# precedence, i.e. (-sd) // 2.


# The reference works (no exception, no wrap-around) for widths of 14 slices and more.
SMALLEST_SOUND_WIDTH = 14


def random_extents(rng: np.random.Generator, count: int, min_width: int = 1) -> list[tuple]:
    extents = []
    for _ in range(count):
        width = int(rng.integers(min_width, clip.CROP_SIZE + 1))
        lo = int(rng.integers(0, clip.CROP_SIZE - width + 1))
        extents.append((lo, lo + width - 1))
    return extents


# ----------------------------------------------------------------------------- mask mode


def test_mask_frames_match_the_reference_on_random_extents():
    rng = np.random.default_rng(1234)
    compared = 0
    for lo, hi in random_extents(rng, 400, min_width=SMALLEST_SOUND_WIDTH):
        width = hi - lo + 1
        shifts = reference_shift_range(width)
        assert clip.view_shifts("mask", (lo, hi)) == shifts
        for shift in [0, *shifts]:
            expected = (lo + reference_frames(width, shift)).tolist()
            assert clip.frame_indices("mask", shift, (lo, hi)) == expected, (lo, hi, shift)
            compared += 1
    assert compared > 1500


def test_mask_frames_over_every_width():
    # Every width the crop allows, at its own lowest and highest placement.
    for width in range(SMALLEST_SOUND_WIDTH, clip.CROP_SIZE + 1):
        for lo in (0, clip.CROP_SIZE - width):
            hi = lo + width - 1
            for shift in reference_shift_range(width):
                expected = lo + reference_frames(width, shift)
                assert expected.min() >= lo and expected.max() <= hi
                assert clip.frame_indices("mask", shift, (lo, hi)) == expected.tolist()


def test_narrow_extents_where_the_reference_breaks_stay_inside():
    # Widths < 14: the reference raises (sd = 0) or wraps index -1 to the last
    # slice; vctmae offers shift 0 alone and clamps into [lo, hi].
    for width in range(1, SMALLEST_SOUND_WIDTH):
        lo = 40
        hi = lo + width - 1
        reference = reference_shift_range(width)
        shifts = clip.view_shifts("mask", (lo, hi))
        assert shifts == (reference or [0])
        for shift in shifts:
            frames = clip.frame_indices("mask", shift, (lo, hi))
            expected = lo + np.clip(reference_frames(width, shift), 0, width - 1)
            assert frames == expected.tolist()


def test_mask_views_are_sd_many_and_bounded():
    counts = set()
    for width in range(SMALLEST_SOUND_WIDTH, clip.CROP_SIZE + 1):
        inner = np.round(np.linspace(0, width - 1, 18)).astype(int)[1:-1]
        views = clip.view_shifts("mask", (0, width - 1))
        assert len(views) == inner[1] - inner[0]
        counts.add(len(views))
    assert max(counts) == clip.MAX_VIEWS
    # The whole crop as the extent (the reference without a mask): 5 views, -3..1.
    assert clip.view_shifts("mask") == reference_shift_range(clip.CROP_SIZE)


# ----------------------------------------------------------------------------- crop mode


def test_crop_mode_is_offset_plus_six_k():
    for offset in range(6):
        expected = [offset + 6 * k for k in range(16)]
        assert clip.frame_indices("crop", offset) == expected
        # the extent plays no part in crop mode
        assert clip.frame_indices("crop", offset, (30, 50)) == expected
    assert clip.view_shifts("crop") == list(range(6))
    assert clip.view_shifts("crop", (10, 20)) == list(range(6))
    for bad in (-1, 6):
        with pytest.raises(ValueError, match="offset"):
            clip.frame_indices("crop", bad)


def test_crop_mode_matches_sample_frames():
    generator = torch.Generator().manual_seed(7)
    crops = torch.randint(-1500, 1500, (6, 96, 96, 96), generator=generator, dtype=torch.int16)
    offsets = torch.tensor([0, 1, 2, 3, 4, 5])
    index = clip.frame_index_tensor("crop", offsets)
    frames = clip.scale_hu(crops[torch.arange(6)[:, None], index])  # (B, 16, 96, 96)
    torch.testing.assert_close(frames, sample_frames(crops, offsets)[:, 0], rtol=0, atol=0)
    assert clip.middle_shift("crop") == clip.view_shifts("crop")[len(clip.view_shifts("crop")) // 2]
    # Training draws: the same numbers as random_offsets from the same generator.
    drawn = clip.draw_train_shifts(
        "crop", batch_size=64, generator=torch.Generator().manual_seed(3)
    )
    offsets = random_offsets(64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(drawn, offsets)


# ----------------------------------------------------------------------------- batched forms


def test_batched_indices_equal_the_list_form_and_stay_in_range():
    rng = np.random.default_rng(99)
    extents = random_extents(rng, 300)
    for mode in clip.FRAME_MODES:
        shift_lists = [clip.view_shifts(mode, e) for e in extents]
        shifts = [int(rng.choice(s)) for s in shift_lists]
        index = clip.frame_index_tensor(mode, torch.tensor(shifts), torch.tensor(extents))
        assert index.dtype == torch.int64 and index.shape == (300, 16)
        for row, shift, extent in zip(index.tolist(), shifts, extents, strict=True):
            assert row == clip.frame_indices(mode, shift, extent)
        # Any shift, however wrong, gives indices inside the extent (mask) / crop (crop).
        wild = torch.from_numpy(rng.integers(-200, 200, 300))
        index = clip.frame_index_tensor(mode, wild, torch.tensor(extents))
        low = torch.tensor(extents)[:, :1] if mode == "mask" else torch.zeros(300, 1)
        high = torch.tensor(extents)[:, 1:] if mode == "mask" else torch.full((300, 1), 95)
        assert bool(((index >= low) & (index <= high)).all())
        assert int(index.min()) >= 0 and int(index.max()) <= clip.CROP_SIZE - 1


def test_batched_indices_without_extents_use_the_whole_crop():
    index = clip.frame_index_tensor("mask", torch.tensor([0, -3]))
    assert index.tolist() == [clip.frame_indices("mask", 0), clip.frame_indices("mask", -3)]


def test_view_shift_table_lists_each_samples_views():
    rng = np.random.default_rng(5)
    extents = random_extents(rng, 200)
    for mode in clip.FRAME_MODES:
        shifts, valid = clip.view_shift_table(mode, torch.tensor(extents))
        assert shifts.shape == valid.shape == (200, clip.MAX_VIEWS)
        for row, ok, extent in zip(shifts.tolist(), valid.tolist(), extents, strict=True):
            views = clip.view_shifts(mode, extent)
            assert ok == [True] * len(views) + [False] * (clip.MAX_VIEWS - len(views))
            assert row[: len(views)] == views
            # padding entries are still legal views
            assert set(row) <= set(views)


def test_draw_train_shifts_covers_each_samples_shifts_uniformly():
    extents = torch.tensor([(0, 95), (20, 69), (10, 16), (30, 93)])
    generator = torch.Generator().manual_seed(11)
    draws = torch.stack(
        [clip.draw_train_shifts("mask", extents, generator=generator) for _ in range(3000)]
    )  # (3000, 4)
    for column, extent in enumerate(extents.tolist()):
        allowed = clip.view_shifts("mask", extent)
        values, counts = draws[:, column].unique(return_counts=True)
        assert values.tolist() == allowed
        # uniform: each of n values ~3000/n times; 6 sigma of a binomial is well inside 25%
        expected = 3000 / len(allowed)
        assert bool(((counts - expected).abs() < 0.25 * expected).all()), counts


# ----------------------------------------------------------------------------- context cut


@pytest.mark.parametrize("recentre", [True, False])
def test_context_cut_keeps_the_box_rows_over_all_columns(recentre):
    rng = np.random.default_rng(21 + recentre)
    boxes = []
    for _ in range(12):
        y0 = int(rng.integers(0, 95))
        y1 = int(rng.integers(y0 + 1, 97))
        x0 = int(rng.integers(0, 90))
        boxes.append((x0, x0 + 5, y0, y1, 3, 60))
    boxes[0] = (10, 50, 0, 96, 0, 96)  # the box fills the crop: nothing cut
    boxes[1] = (10, 50, 2, 5, 0, 96)  # near the top: the margin is clamped at row 0
    crops = torch.from_numpy(rng.integers(-1200, 1500, (12, 96, 96, 96)).astype(np.int16))
    out = clip.context_cut(crops, torch.tensor(boxes), recentre=recentre)
    assert out.dtype == torch.int16 and out.shape == crops.shape
    for b, box in enumerate(boxes):
        expected = reference_context_cut(crops[b].numpy(), box, recentre)
        assert np.array_equal(out[b].numpy(), expected), b


def test_context_cut_commutes_with_frame_selection_and_skips_empty_boxes():
    generator = torch.Generator().manual_seed(4)
    crops = torch.randint(-1200, 1500, (3, 96, 96, 96), generator=generator, dtype=torch.int16)
    boxes = torch.tensor([(20, 70, 30, 62, 5, 80), (0, 0, 0, 0, 0, 0), (33, 60, 50, 96, 0, 90)])
    extents = torch.tensor([clip.extent_from_bbox(box) for box in boxes.tolist()])
    index = clip.frame_index_tensor("mask", torch.tensor([-2, 0, 1]), extents)
    rows = torch.arange(3)[:, None]
    whole_then_frames = clip.context_cut(crops, boxes)[rows, index]
    frames_then_cut = clip.context_cut(crops[rows, index], boxes)
    assert torch.equal(whole_then_frames, frames_then_cut)
    # an empty box (no mask voxels) cuts nothing
    assert torch.equal(clip.context_cut(crops[1:2], boxes[1:2]), crops[1:2])


# ----------------------------------------------------------------------------- small helpers


def test_a_mask_box_gives_its_sagittal_extent_or_is_refused():
    assert clip.extent_from_bbox((12, 61, 0, 96, 5, 7)) == (12, 60)
    assert clip.extent_from_bbox([0, 96, 1, 2, 3, 4]) == (0, 95)
    assert clip.extent_from_bbox((0, 0, 0, 0, 0, 0)) == clip.FULL_EXTENT
    for bad in [(0, 97, 0, 1, 0, 1), (-1, 5, 0, 1, 0, 1), (9, 4, 0, 1, 0, 1), (1, 2, 3)]:
        with pytest.raises(ValueError):
            clip.extent_from_bbox(bad)


def test_modes_and_extents_are_checked():
    with pytest.raises(ValueError, match="frame mode"):
        clip.frame_indices("random")
    with pytest.raises(ValueError, match="frame mode"):
        clip.frame_index_tensor("sagittal", torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="extent"):
        clip.frame_indices("mask", 0, (50, 40))
    with pytest.raises(ValueError, match="extents for"):
        clip.frame_index_tensor("mask", torch.zeros(3, dtype=torch.long), torch.zeros(2, 2))


def test_scale_hu_window():
    hu = torch.tensor([-3000, -1000, -500, 0, 999, 1000, 2500], dtype=torch.int16)
    expected = np.clip((hu.numpy().astype(np.float64) + 1000) / 2000, 0, 1)
    torch.testing.assert_close(clip.scale_hu(hu), torch.from_numpy(expected).float())
    # the pad value maps to 0, as the reference's constant-0 padding after scaling
    assert float(clip.scale_hu(torch.tensor(clip.PAD_HU))) == 0.0


def test_the_rules_and_the_loader_options_import_without_torch():
    """The command line and ingest read the clip rules, the loader options and the training
    config without paying for torch: none of these modules imports it at import time."""
    code = (
        "import sys\n"
        "import vctmae.clip, vctmae.data.batch, vctmae.data.options, vctmae.train.config\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] == 'torch'))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"
