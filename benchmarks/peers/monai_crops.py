"""Vertebra crops the way a MONAI user writes them: the ingest benchmark's peer.

Per case, with MONAI's dictionary transforms at their documented defaults:
`LoadImaged` of the CT and its label map (MONAI's default reader for NIfTI),
`EnsureChannelFirstd`, `Orientationd("RAS")`, `Spacingd` to 1 mm (CT bilinear,
labels nearest); then, for each vertebra label value asked for, its centroid in
the resampled label map and one `SpatialCrop` of 96³ centred there, saved with
`SaveImage` as int16 NIfTI (.nii.gz). The crops stay on the scanner axes: no
alignment to the spine's curve (vctmae's crops follow it; their cost is in
vctmae's number only), and a crop at the scan border comes out smaller.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    Orientationd,
    SaveImage,
    Spacingd,
    SpatialCrop,
)

SIZE = 96


def load_transform() -> Compose:
    """Load, channel first, RAS, 1 mm: what the recipe runs once per case."""
    keys = ["image", "label"]
    return Compose(
        [
            LoadImaged(keys=keys),
            EnsureChannelFirstd(keys=keys),
            Orientationd(keys=keys, axcodes="RAS"),
            Spacingd(keys=keys, pixdim=(1.0, 1.0, 1.0), mode=("bilinear", "nearest")),
        ]
    )


def monai_crops(ct: Path, seg: Path, values: Sequence[int], out: Path) -> int:
    """Cut and save one 96³ int16 crop per vertebra label value in `values` present in the
    case; returns how many were saved."""
    case = load_transform()({"image": str(ct), "label": str(seg)})
    image, label = case["image"], case["label"]
    labels = np.asarray(label[0])
    Path(out).mkdir(parents=True, exist_ok=True)
    saver = SaveImage(
        output_dir=str(out),
        output_postfix="",
        output_ext=".nii.gz",
        output_dtype=np.int16,
        separate_folder=False,
        print_log=False,
    )
    stem = Path(ct).name.split(".")[0]
    saved = 0
    for value in values:
        voxels = np.argwhere(labels == value)
        if not len(voxels):
            continue
        centre = [int(round(c)) for c in voxels.mean(axis=0)]
        crop = SpatialCrop(roi_center=centre, roi_size=(SIZE, SIZE, SIZE))(image)
        saver(crop, filename=Path(out) / f"{stem}_{value}")
        saved += 1
    return saved
