"""Draw docs/predict-seg.png: predict's DICOM SEG, read back with highdicom, over its CT series.

    python docs/predict_seg_picture.py SERIES_FOLDER REPORT/CASE docs/predict-seg.png

Left, a sagittal reformat through the spine's middle column; right, the axial frame through
the middle of the first segment (the highest vertebra). Each segment is tinted and labelled with its SEG label.
"""

from __future__ import annotations

import sys
from pathlib import Path

import highdicom as hd
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pydicom  # noqa: E402


def main(series: Path, case: Path, out: Path) -> None:
    headers = [pydicom.dcmread(p) for p in sorted(series.iterdir())]
    normal = np.cross(
        np.array(headers[0].ImageOrientationPatient[:3], dtype=float),
        np.array(headers[0].ImageOrientationPatient[3:], dtype=float),
    )
    headers.sort(key=lambda h: float(np.array(h.ImagePositionPatient, dtype=float) @ normal))
    hu = np.stack(
        [h.pixel_array * float(h.RescaleSlope) + float(h.RescaleIntercept) for h in headers]
    )
    seg = hd.seg.segread(case / "vertebrae.seg.dcm")
    labels = [s.SegmentLabel for s in seg.SegmentSequence]
    masks = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[h.SOPInstanceUID for h in headers],
        segment_numbers=list(range(1, len(labels) + 1)),
    ).astype(bool)  # (slices, rows, columns, segments)
    row_mm, column_mm = (float(v) for v in headers[0].PixelSpacing)
    slice_mm = float(
        np.linalg.norm(
            np.subtract(
                headers[1].ImagePositionPatient, headers[0].ImagePositionPatient, dtype=float
            )
        )
    )
    colours = plt.get_cmap("tab10")(np.arange(len(labels)) % 10)

    def tint(ax, image, planes, extent):
        ax.imshow(image, cmap="gray", vmin=-300, vmax=1200, extent=extent, origin="lower")
        for index in range(planes.shape[-1]):
            overlay = np.zeros((*planes.shape[:2], 4))
            overlay[planes[..., index]] = (*colours[index][:3], 0.45)
            ax.imshow(overlay, extent=extent, origin="lower", interpolation="nearest")
        ax.set_axis_off()

    # Sagittal: slices upwards (superior up), rows across.
    any_segment = masks.any(axis=-1)
    column = int(np.round(np.nonzero(any_segment)[2].mean()))
    sagittal_extent = (0, hu.shape[1] * row_mm, 0, hu.shape[0] * slice_mm)
    figure, (left, right) = plt.subplots(
        1, 2, figsize=(10, 6), gridspec_kw={"width_ratios": [1, 1.2]}
    )
    tint(left, hu[:, :, column], masks[:, :, column, :], sagittal_extent)
    for index, label in enumerate(labels):
        slices, rows = np.nonzero(masks[:, :, column, index])
        if slices.size:
            left.text(
                rows.max() * row_mm + 6, slices.mean() * slice_mm, label,
                color=colours[index], fontsize=10, fontweight="bold", va="center",
            )  # fmt: skip
    left.set_title(f"sagittal reformat, column {column}", fontsize=10)

    # Axial: the middle frame of the first segment, as the SEG frame stores it (rows down).
    slices = np.nonzero(masks[..., 0].any(axis=(1, 2)))[0]
    frame = int(slices[len(slices) // 2])
    axial_extent = (0, hu.shape[2] * column_mm, hu.shape[1] * row_mm, 0)
    right.imshow(hu[frame], cmap="gray", vmin=-300, vmax=1200, extent=axial_extent)
    for index in range(len(labels)):
        overlay = np.zeros((*hu.shape[1:], 4))
        overlay[masks[frame, :, :, index]] = (*colours[index][:3], 0.45)
        right.imshow(overlay, extent=axial_extent, interpolation="nearest")
    right.set_axis_off()
    present = [labels[i] for i in range(len(labels)) if masks[frame, :, :, i].any()]
    right.set_title(f"source slice {frame + 1}: {', '.join(present)}", fontsize=10)
    figure.suptitle(
        f"{case.name}/vertebrae.seg.dcm read back with highdicom: "
        f"{len(labels)} segments over the source CT series",
        fontsize=11,
    )
    figure.tight_layout()
    figure.savefig(out, dpi=80)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
