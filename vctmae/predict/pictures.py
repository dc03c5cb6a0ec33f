"""The pictures of a predict report: the spine's sagittal overview and each vertebra's frames.

`overview_svg` draws the sagittal plane through the spine's midline — CT in a bone
window, head up, anterior on the left as a radiologist reads a sagittal image —
with each assessed vertebra's mask tinted by its fracture probability and labelled
with its level and probability; vertebrae of the label map that were not assessed
are outlined in grey with the reason. Written as SVG with its text as text, so the
labels stay sharp at any zoom (and can be searched).

`vertebra_png` draws what the model saw of one vertebra — the 16 sagittal frames of
the middle view, patient's left to right — above the same frames with the
attention rollout (`vctmae.infer.attention.shown_views`) laid over them.

Colours: probability → a blue–white–red scale whose white sits at the decision
threshold (blue: below, no fracture called; red: above, fracture called).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vctmae.files import write_atomically
from vctmae.ingest.nifti import Volume, oriented_view
from vctmae.predict.results import NotAssessed, VertebraResult

# Crop axes, as ingest's geometry stores them: +x (towards the patient's right), inferior,
# posterior. A sagittal plane of this view is (rows superior → inferior, columns anterior →
# posterior): the radiological sagittal display.
VIEW = "RIP"
BONE_WINDOW_HU = (-250.0, 1250.0)
# Label voxels within this distance of the plane tint it (a curved spine leaves the plane).
SLAB_MM = 12.0
MARGIN_MM = 25.0
NOT_ASSESSED_COLOUR = "#6e6e6e"
OUTLINE = (0.2, 0.85, 1.0)  # the assessed vertebra's box in its frames (cyan)


def _matplotlib():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def probability_colours(threshold: float):
    """(colormap, norm): blue below the threshold, white at it, red above."""
    from matplotlib import colormaps
    from matplotlib.colors import TwoSlopeNorm

    centre = min(max(threshold, 1e-3), 1 - 1e-3)
    return colormaps["coolwarm"], TwoSlopeNorm(vmin=0.0, vcenter=centre, vmax=1.0)


def probability_hex(prob: float, threshold: float) -> str:
    """The report's colour of a probability (the same scale as the pictures)."""
    from matplotlib.colors import to_hex

    cmap, norm = probability_colours(threshold)
    return to_hex(cmap(norm(prob)))


def _world_to_view(view: Volume, points: np.ndarray) -> np.ndarray:
    """World mm (N, 3) → fractional voxel indices (N, 3) of `view`."""
    inverse = np.linalg.inv(view.affine)
    return points @ inverse[:3, :3].T + inverse[:3, 3]


def overview_svg(
    ct: Volume,
    labels: Volume,
    vertebrae: Sequence[VertebraResult],
    label_values: dict[str, int],
    not_assessed: Sequence[NotAssessed],
    threshold: float,
    path: Path,
    *,
    title: str,
) -> Path:
    """Write the sagittal overview (module docstring) to `path`; returns it.

    `label_values` maps each level (assessed or not) to its value in `labels`.
    """
    plt = _matplotlib()
    from matplotlib import patheffects

    ct_view, label_view = oriented_view(ct, VIEW), oriented_view(labels, VIEW)
    spacing = np.linalg.norm(ct_view.affine[:3, :3], axis=0)  # mm per index along x, I, P
    levels_shown = [v.level for v in vertebrae] + [n.level for n in not_assessed]
    values = [label_values[level] for level in levels_shown if level in label_values]
    centroids = np.array([v.centroid for v in vertebrae], dtype=np.float64).reshape(-1, 3)

    # The plane: through the median left-right position of the assessed vertebrae (else of
    # the labelled region).
    if len(centroids):
        midline = float(np.median(_world_to_view(ct_view, centroids)[:, 0]))
    else:
        labelled = np.flatnonzero(np.isin(label_view.data, values).any(axis=(1, 2)))
        midline = float(np.median(labelled)) if labelled.size else ct_view.data.shape[0] / 2
    plane = int(np.clip(round(midline), 0, ct_view.data.shape[0] - 1))
    reach = max(0, int(round(SLAB_MM / spacing[0])))
    slab = slice(max(0, plane - reach), plane + reach + 1)
    hu = np.asarray(ct_view.data[plane], dtype=np.float32) * ct_view.slope + ct_view.intercept
    # Each label voxel of the slab seen from the side (vertebrae do not overlap left-right).
    side = np.asarray(label_view.data[slab]).max(axis=0)
    shown = np.isin(side, values) if values else np.zeros(side.shape, bool)

    # Field of view: the shown vertebrae and a margin (a whole-body CT stays readable).
    rows, cols = np.nonzero(shown)
    if rows.size:
        margin = (int(MARGIN_MM / spacing[1]), int(MARGIN_MM / spacing[2]))
        top, bottom = max(0, rows.min() - margin[0]), min(hu.shape[0], rows.max() + margin[0] + 1)
        front, back = max(0, cols.min() - margin[1]), min(hu.shape[1], cols.max() + margin[1] + 1)
    else:
        top, bottom, front, back = 0, hu.shape[0], 0, hu.shape[1]
    hu, side = hu[top:bottom, front:back], side[top:bottom, front:back]
    height_mm, width_mm = hu.shape[0] * spacing[1], hu.shape[1] * spacing[2]
    extent = (0.0, width_mm, height_mm, 0.0)

    cmap, norm = probability_colours(threshold)
    tint = np.zeros((*hu.shape, 4), dtype=np.float32)
    for vertebra in vertebrae:
        mask = side == label_values.get(vertebra.level, -1)
        tint[mask] = (*cmap(norm(vertebra.prob_fracture))[:3], 0.5)
    for skipped in not_assessed:
        mask = side == label_values.get(skipped.level, -1)
        tint[mask] = (0.6, 0.6, 0.6, 0.35)

    figure_height = 7.5
    figure_width = min(10.0, max(5.5, figure_height * width_mm / max(height_mm, 1.0) + 3.6))
    fig, ax = plt.subplots(figsize=(figure_width, figure_height))
    ax.imshow(
        hu, cmap="gray", vmin=BONE_WINDOW_HU[0], vmax=BONE_WINDOW_HU[1], extent=extent,
        interpolation="bilinear",
    )  # fmt: skip
    ax.imshow(tint, extent=extent, interpolation="nearest")
    ax.set_xlim(-0.42 * width_mm, width_mm)
    # A band below the image holds the scale bar.
    ax.set_ylim(height_mm + 12.0, 0)
    ax.set_axis_off()

    def row_of(point: np.ndarray) -> tuple[float, float]:
        index = _world_to_view(ct_view, point[None])[0]
        return (index[2] - front) * spacing[2], (index[1] - top) * spacing[1]

    outline = [patheffects.withStroke(linewidth=2.5, foreground="black")]
    label_x = -0.04 * width_mm
    for vertebra in vertebrae:
        x, y = row_of(np.asarray(vertebra.centroid))
        colour = cmap(norm(vertebra.prob_fracture))
        call = "  FRACTURE?" if vertebra.predicted else ""
        ax.annotate(
            f"{vertebra.level}  {vertebra.prob_fracture:.2f}{call}",
            xy=(x, y), xytext=(label_x, y), ha="right", va="center",
            fontsize=10, fontweight="bold" if vertebra.predicted else "normal",
            color="black",
            bbox={"boxstyle": "round,pad=0.25", "facecolor": colour, "edgecolor": "black",
                  "linewidth": 0.6},
            arrowprops={"arrowstyle": "-", "color": "white", "linewidth": 0.8},
        )  # fmt: skip
    # Not-assessed levels: beside their mask (their centroid is not computed for skipped ones).
    for skipped in not_assessed:
        mask_rows = np.flatnonzero((side == label_values.get(skipped.level, -1)).any(axis=1))
        if not mask_rows.size:
            continue
        y = float(mask_rows.mean() + 0.5) * spacing[1]
        ax.text(
            label_x, y, f"{skipped.level}  not assessed ({skipped.reason.split(':')[0]})",
            ha="right", va="center", fontsize=8.5, color=NOT_ASSESSED_COLOUR, fontstyle="italic",
        )  # fmt: skip
    for text, x, y, align in (
        ("A", 0.01 * width_mm, 0.5 * height_mm, "left"),
        ("P", 0.99 * width_mm, 0.5 * height_mm, "right"),
        ("S", 0.5 * width_mm, 0.02 * height_mm, "center"),
        ("I", 0.5 * width_mm, 0.98 * height_mm, "center"),
    ):
        ax.text(x, y, text, ha=align, va="center", color="white", fontsize=9, path_effects=outline)
    # A 5 cm scale bar under the image's right end.
    bar_y = height_mm + 7.0
    ax.plot([width_mm - 50, width_mm], [bar_y, bar_y], color="black", linewidth=2)
    ax.text(
        width_mm - 52, bar_y, "5 cm", ha="right", va="center", color="black", fontsize=8,
    )  # fmt: skip

    from matplotlib.cm import ScalarMappable

    bar = fig.colorbar(
        ScalarMappable(norm=norm, cmap=cmap), ax=ax, fraction=0.035, pad=0.02, shrink=0.6
    )
    bar.set_ticks([0.0, threshold, 1.0])
    bar.set_ticklabels(["0", f"threshold {threshold:.2f}", "1"])
    bar.set_label("P(fracture)")
    ax.set_title(title, fontsize=10, loc="left")
    fig.tight_layout()
    with plt.rc_context({"svg.fonttype": "none"}):
        path = write_atomically(path, lambda handle: fig.savefig(handle, format="svg"))
    plt.close(fig)
    return path


def vertebra_png(
    frames: np.ndarray,
    attention: np.ndarray,
    path: Path,
    *,
    slices: Sequence[int],
    centre: float,
    spacing: float,
    box: Sequence[int] | None = None,
    per_row: int = 8,
) -> Path:
    """Write one vertebra's frames, each above itself with attention (module docstring).

    `frames` (16, H, W) are the model's input in [0, 1] (HU −1000…1000), drawn in the
    overview's bone window; `attention` (16, H, W) in [0, 1] is laid over them, opaque
    where it is high and clear where it is low. `slices` is the crop slice of each frame
    and `centre` the crop's centre slice, for the left-right position above each frame.
    Frames run `per_row` to a row, the patient's left first. `box`, the vertebra mask's
    box in crop indices (x0, x1, y0, y1, z0, z1), is outlined on the frames that cut it:
    a crop shows its neighbours too. The tiles are composed as one array and drawn in a
    single image (32 separate plots take ~10× longer).
    """
    from matplotlib import colormaps

    from vctmae.clip import HU_MAX, HU_MIN

    plt = _matplotlib()
    count, height, width = frames.shape
    hu = frames * (HU_MAX - HU_MIN) + HU_MIN
    low, high = BONE_WINDOW_HU
    grey = np.clip((hu - low) / (high - low), 0.0, 1.0)[..., None].repeat(3, axis=-1)
    # Low attention: nearly clear; high: opaque yellow (inferno's upper part, never black).
    heat = colormaps["inferno"](0.3 + 0.7 * attention)[..., :3]  # (16, H, W, 3)
    weight = (0.85 * attention)[..., None]
    overlaid = grey * (1 - weight) + heat * weight
    crop = round(2 * centre + 1)
    # The box is in crop indices: drawn only on frames that are the crop's slices as they are.
    if box is not None and (height, width) == (crop, crop):
        x0, x1, y0, y1, z0, z1 = (int(v) for v in box)
        bottom, right = min(y1, height) - 1, min(z1, width) - 1
        for k, index in enumerate(slices):
            if x0 <= index < x1 and y0 < y1 and z0 < z1:
                for picture in (grey, overlaid):
                    picture[k, y0, z0 : right + 1] = picture[k, bottom, z0 : right + 1] = OUTLINE
                    picture[k, y0 : bottom + 1, z0] = picture[k, y0 : bottom + 1, right] = OUTLINE
    blocks, gap, band = -(-count // per_row), 3, 16  # band: the caption row above a block
    tile_h, tile_w = height + gap, width + gap
    block_h = band + 2 * tile_h
    label_w = 18
    mosaic = np.ones((blocks * block_h, label_w + per_row * tile_w, 3), dtype=np.float32)
    for k in range(count):
        block, column = divmod(k, per_row)
        for row, picture in enumerate((grey, overlaid)):
            top, left = block * block_h + band + row * tile_h, label_w + column * tile_w
            mosaic[top : top + height, left : left + width] = picture[k]
    # Laid out at one pixel per crop voxel (1 mm).
    dpi = 100
    fig = plt.figure(figsize=(mosaic.shape[1] / dpi, mosaic.shape[0] / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_axis_off()
    for k in range(count):
        block, column = divmod(k, per_row)
        offset_mm = (slices[k] - centre) * spacing
        side = "right" if offset_mm > 0 else "left"
        ax.text(
            label_w + column * tile_w + width / 2, block * block_h + band / 2,
            f"{abs(offset_mm):.0f} mm {side}", ha="center", va="center", fontsize=7.5,
        )  # fmt: skip
    for block in range(blocks):
        for row, name in enumerate(("CT", "attention")):
            ax.text(
                label_w / 2, block * block_h + band + row * tile_h + height / 2, name,
                ha="center", va="center", rotation=90, fontsize=7.5,
            )  # fmt: skip
    # Saved at 1.5 px per voxel: about the width the page shows it at, text sharp.
    # zlib level 3: half the encoding time of the default 6, files ~10 % larger.
    options = {"format": "png", "dpi": 1.5 * dpi, "pil_kwargs": {"compress_level": 3}}
    path = write_atomically(path, lambda handle: fig.savefig(handle, **options))
    plt.close(fig)
    return path
