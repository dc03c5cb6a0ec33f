"""The paper code's training data path, set up with MONAI as that code sets it up.

The public code of the Video-CT MAE paper (github lbuess/Video-CT_MAE,
`src/pretraining/data.py` and `main_pretrain.py`) trains from one NIfTI image and
one NIfTI label map per vertebra, listed as `{"image", "mask", "level_idx"}`
records, through a `monai.data.Dataset` whose transform runs at every access:

1. `LoadImaged` of image and mask (MONAI's default reader), `EnsureChannelFirstd`;
2. the label map becomes the vertebra's mask (`mask == level_idx`);
3. `ScaleIntensityRanged` −1000…1000 HU → 0…1, clipped;
4. `CropForegroundd` of the image to the mask's box, margin (0, 16, 100), smaller allowed;
5. `ResizeWithPadOrCropd` to (−1, 96, 96): every axis but the first to 96;
6. its own frame sampling: 16 of 18 evenly spread indices along the first axis (the ends
   dropped), all moved by one random shift in [−d//2, d//2) for index spacing d, each
   frame repeated into 3 channels;
7. `ResizeWithPadOrCropd` to (16, 96, 96), `RandFlipd` of spatial axis 1 with p = 0.5.

Batches come from a plain `torch.utils.data.DataLoader` over a `RandomSampler`
with `drop_last=True` (pinned memory when the batches go to a GPU), at the
worker count it is given: the paper's default is 0. No `CacheDataset`: the paper's
code does not use one. Steps 2 and 6 are the paper's own small transforms,
written here from their description (they are not part of MONAI).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import Dataset
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    LoadImaged,
    MapTransform,
    RandFlipd,
    Randomizable,
    ResizeWithPadOrCropd,
    ScaleIntensityRanged,
)
from torch.utils.data import DataLoader, RandomSampler

FRAMES = 16


class LabelMapToMaskd(MapTransform):
    """The vertebra's mask: the label map equal to the record's `level_idx`."""

    def __call__(self, data):
        record = dict(data)
        for key in self.key_iterator(record):
            record[key] = record[key] == record["level_idx"]
        return record


class SampleFramesd(Randomizable, MapTransform):
    """16 frames along the first spatial axis, evenly spread and shifted together at random,
    each repeated into 3 channels (grey → RGB)."""

    def __init__(self, keys, frames: int = FRAMES) -> None:
        MapTransform.__init__(self, keys)
        self.frames = frames

    def __call__(self, data):
        record = dict(data)
        for key in self.key_iterator(record):
            volume = record[key]
            spread = np.linspace(0, volume.shape[1] - 1, self.frames + 2)
            index = np.round(spread).astype(int)[1:-1]
            spacing = int(index[1] - index[0])
            index = index + int(self.R.randint(-spacing // 2, spacing // 2))
            frames = volume[:, index]
            record[key] = torch.cat([frames, frames, frames], dim=0)
        return record


def paper_transform(size: int = 96) -> Compose:
    """The paper's pretraining transform chain (module docstring), for crops of `size`."""
    return Compose(
        [
            LoadImaged(keys=["image", "mask"]),
            EnsureChannelFirstd(keys=["image", "mask"]),
            LabelMapToMaskd(keys="mask"),
            ScaleIntensityRanged(
                keys="image", a_min=-1000, a_max=1000, b_min=0, b_max=1, clip=True
            ),
            CropForegroundd(
                keys="image", source_key="mask", allow_smaller=True, margin=(0, 16, 100)
            ),
            ResizeWithPadOrCropd(keys="image", mode="constant", spatial_size=(-1, size, size)),
            SampleFramesd(keys="image"),
            ResizeWithPadOrCropd(keys="image", mode="constant", spatial_size=(FRAMES, size, size)),
            RandFlipd(keys="image", spatial_axis=1, prob=0.5),
        ]
    )


def write_records(
    folder: Path, crops: np.ndarray, label_maps: np.ndarray, values: Sequence[int]
) -> list[dict]:
    """Each crop as `raw/NAME.nii.gz` and its label map as `seg/NAME.nii.gz` (the paper's
    layout); returns the dataset records, `level_idx` being the vertebra's label value."""
    records = []
    for kind in ("raw", "seg"):
        (folder / kind).mkdir(parents=True, exist_ok=True)
    for index, (crop, label_map, value) in enumerate(zip(crops, label_maps, values, strict=True)):
        name = f"vertebra{index:05d}.nii.gz"
        nib.save(nib.Nifti1Image(crop, np.eye(4)), folder / "raw" / name)
        nib.save(nib.Nifti1Image(label_map, np.eye(4)), folder / "seg" / name)
        records.append(
            {
                "image": str(folder / "raw" / name),
                "mask": str(folder / "seg" / name),
                "level_idx": int(value),
            }
        )
    return records


def paper_loader(
    records: list[dict], *, batch_size: int, workers: int, pin_memory: bool = False, seed: int = 0
) -> DataLoader:
    """The paper's DataLoader over `records` (module docstring)."""
    dataset = Dataset(data=records, transform=paper_transform())
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        sampler=RandomSampler(dataset, generator=generator),
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=True,
    )


def paper_epoch(
    records: list[dict], *, batch_size: int, workers: int, device: torch.device
) -> Callable[[], int]:
    """One epoch of the paper's DataLoader, its batches moved to `device` as its training loop
    moves them; the epoch returns the samples it read."""
    loader = paper_loader(
        records, batch_size=batch_size, workers=workers, pin_memory=device.type == "cuda"
    )

    def epoch() -> int:
        count = 0
        for batch in loader:
            batch["image"].to(device, non_blocking=True)
            count += len(batch["image"])
        return count

    return epoch
