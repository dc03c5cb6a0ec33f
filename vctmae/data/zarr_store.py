"""Random access to ingest's Zarr store (`out/crops.zarr`) for eval, explain and inspection."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vctmae.clip import ZARR_CLASSES, ZARR_CROPS
from vctmae.errors import VctmaeError


class ZarrStoreError(VctmaeError, ValueError):
    """A path that is not a readable crops.zarr store written by ingest."""


class MissingKeyError(VctmaeError, KeyError):
    """No crop with this key in the store; str() is the message, not KeyError's quoted repr."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ZarrCrops:
    """Crops by key from a store with arrays `crops` (N,96,96,96) int16, `classes` int8 and attr `keys`."""

    def __init__(self, path: str | os.PathLike):
        import zarr

        self.path = Path(path)
        try:
            group = zarr.open_group(str(self.path), mode="r")
            self._crops = group[ZARR_CROPS]
            self._classes = np.asarray(group[ZARR_CLASSES][:], dtype=np.int64)
            self.keys: list[str] = list(group.attrs["keys"])
            self._bboxes = group.attrs.get("bboxes")
        except (FileNotFoundError, KeyError, ValueError, TypeError) as error:
            # What zarr raises for a missing, foreign or damaged store (not found, no such
            # array or attribute, unreadable metadata).
            raise ZarrStoreError(f"{self.path}: not a vctmae crops.zarr store ({error})") from None
        if len(self.keys) != self._crops.shape[0] or len(self._classes) != len(self.keys):
            raise ZarrStoreError(
                f"{self.path}: attrs 'keys', 'crops' and 'classes' disagree in length"
            )
        self._row = {key: row for row, key in enumerate(self.keys)}

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: str) -> bool:
        return key in self._row

    def _index(self, key: str) -> int:
        try:
            return self._row[key]
        except KeyError:
            raise MissingKeyError(
                f"{self.path}: no crop with key {key!r} ({len(self.keys)} keys)"
            ) from None

    def crop(self, key: str) -> np.ndarray:
        """The int16 (96, 96, 96) crop in video order."""
        return np.asarray(self._crops[self._index(key)], dtype=np.int16)

    def bbox(self, key: str) -> tuple[int, ...]:
        """The crop's vertebra mask box in crop indices (x0, x1, y0, y1, z0, z1), half-open."""
        if self._bboxes is None:
            raise ZarrStoreError(
                f"{self.path}: the store records no mask boxes (--frames mask needs them); "
                "ingest the data again with this vctmae"
            )
        return tuple(int(v) for v in self._bboxes[self._index(key)])

    def label(self, key: str) -> int:
        """Class of the crop (−1 when unlabeled)."""
        return int(self._classes[self._index(key)])
