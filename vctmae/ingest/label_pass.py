"""One compiled pass over a label map: voxel counts and bounding boxes (`geometry`'s census).

A clinical label map is ~80 M voxels. Counting every value and finding the box of every
vertebra value with numpy and `scipy.ndimage.find_objects` walks it three times and copies
the labelled voxels; these loops walk it once each, in memory order, and give the same
numbers: positive values counted, values ≤ 0 background, boxes as `find_objects` gives
them. `available` is False without numba (the numpy passes then run).
"""

from __future__ import annotations

import numpy as np

try:
    import numba
except ImportError:  # a core dependency; without it geometry's numpy passes run
    numba = None

available = numba is not None

if numba is not None:

    @numba.njit(cache=True, nogil=True)
    def _census_kernel(data, counts, low, high):
        n0, n1, n2 = data.shape
        for a in range(n0):
            for b in range(n1):
                first, last = n2, -1
                for c in range(n2):
                    value = data[a, b, c]
                    if value > 0:
                        counts[value] += 1
                        if first == n2:
                            first = c
                        last = c
                if last >= 0:
                    low[0], high[0] = min(low[0], a), max(high[0], a)
                    low[1], high[1] = min(low[1], b), max(high[1], b)
                    low[2], high[2] = min(low[2], first), max(high[2], last)

    # A vertebra's voxels come in runs along the fastest axis: each run is found by a tight
    # compare loop and boxed once.
    @numba.njit(cache=True, nogil=True)
    def _boxes_kernel(data, top, low, high):
        n0, n1, n2 = data.shape
        for a in range(n0):
            for b in range(n1):
                c = 0
                while c < n2:
                    value = data[a, b, c]
                    start = c
                    c += 1
                    while c < n2 and data[a, b, c] == value:
                        c += 1
                    if 0 < value <= top:
                        low[value, 0] = min(low[value, 0], a)
                        high[value, 0] = max(high[value, 0], a)
                        low[value, 1] = min(low[value, 1], b)
                        high[value, 1] = max(high[value, 1], b)
                        low[value, 2] = min(low[value, 2], start)
                        high[value, 2] = max(high[value, 2], c - 1)


def census(data: np.ndarray) -> tuple[dict[int, int], np.ndarray, np.ndarray]:
    """Voxel count of every positive value of `data` (integers of ≤ 2 bytes), and the box
    [low, high) of all of them per axis (meaningless when nothing is labelled)."""
    counts = np.zeros(int(np.iinfo(data.dtype).max) + 1, dtype=np.int64)
    low = np.full(3, np.iinfo(np.int64).max, dtype=np.int64)
    high = np.full(3, -1, dtype=np.int64)
    _census_kernel(data, counts, low, high)
    values = np.flatnonzero(counts)
    found = dict(zip(values.tolist(), counts[values].tolist(), strict=True))
    return found, low, high + 1


def vertebra_boxes(data: np.ndarray, top: int) -> list[tuple[slice, ...] | None]:
    """`scipy.ndimage.find_objects(data, max_label=top)`: the box of each value 1 … top."""
    low = np.full((top + 1, 3), np.iinfo(np.int64).max, dtype=np.int64)
    high = np.full((top + 1, 3), -1, dtype=np.int64)
    _boxes_kernel(data, top, low, high)
    return [
        None
        if high[value, 0] < 0
        else tuple(slice(int(low[value, axis]), int(high[value, axis]) + 1) for axis in range(3))
        for value in range(1, top + 1)
    ]
