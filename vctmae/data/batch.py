"""What the loader hands out (`Batch`) and the ways it can read (`BACKENDS`, `CACHES`).

A leaf module, torch-free at import, shared by the loader, its DALI backend, its device cache and
the command line's loader options, so that none of them needs to import another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

BACKENDS = ("torch", "dali")
CACHES = ("none", "device")


@dataclass(frozen=True)
class Batch:
    """int16 crops (B, 96, 96, 96), int64 labels (B,) (−1 = unlabeled), the samples' keys, and
    their mask boxes: int64 (B, 6), each sample's JSON `bbox` (`ShardIndex.boxes`; what
    `--frames mask` needs), or None where a source has none."""

    crops: torch.Tensor
    labels: torch.Tensor
    keys: list[str]
    boxes: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        boxes = None if self.boxes is None else self.boxes.to(device, non_blocking=non_blocking)
        return Batch(
            self.crops.to(device, non_blocking=non_blocking),
            self.labels.to(device, non_blocking=non_blocking),
            self.keys,
            boxes,
        )
