"""One compiled pass over a label map: voxel counts, bounding boxes and index sums
(`geometry`'s census).

A clinical label map is ~80 M voxels. Counting every value, finding the box of every
vertebra value and the centroid of each with numpy and `scipy.ndimage` walks it several
times and copies the labelled voxels; this loop walks it once, in memory order, and gives
the same numbers. `available` is False without numba (the numpy passes then run).
"""

from __future__ import annotations

import numpy as np

try:
    import numba
except ImportError:  # a core dependency; without it geometry's numpy passes run
    numba = None

available = numba is not None

if numba is not None:

    @numba.njit(cache=True, nogil=True, inline="always")
    def _extend(low, high, row, a, b, first, last):
        low[row, 0], high[row, 0] = min(low[row, 0], a), max(high[row, 0], a)
        low[row, 1], high[row, 1] = min(low[row, 1], b), max(high[row, 1], b)
        low[row, 2], high[row, 2] = min(low[row, 2], first), max(high[row, 2], last)

    # A label's voxels come in runs along the fastest axis: each run is found by a tight
    # compare loop, then counted, boxed and summed once.
    @numba.njit(cache=True, nogil=True)
    def _stats_kernel(data, top, counts, low, high, sums):
        n0, n1, n2 = data.shape
        for a in range(n0):
            for b in range(n1):
                # Most rows hold no label: a plain scan (vectorised) tells so at memory speed.
                labelled = False
                for c in range(n2):
                    labelled |= data[a, b, c] > 0
                if not labelled:
                    continue
                c = 0
                while c < n2:
                    value = data[a, b, c]
                    first = c
                    c += 1
                    while c < n2 and data[a, b, c] == value:
                        c += 1
                    if value <= 0:
                        continue
                    run = c - first
                    counts[value] += run
                    _extend(low, high, 0, a, b, first, c - 1)
                    if value <= top:
                        _extend(low, high, value, a, b, first, c - 1)
                        sums[value, 0] += a * run
                        sums[value, 1] += b * run
                        sums[value, 2] += (first + c - 1) * run // 2


def label_stats(
    data: np.ndarray, top: int
) -> tuple[dict[int, int], list[tuple[slice, ...] | None], np.ndarray]:
    """One pass over `data` (integers of ≤ 2 bytes; values ≤ 0 are background).

    Returns the voxel count of every positive value; boxes, as `find_objects` gives them:
    at index 0 the box of all positive voxels, at index v (1 … top) value v's (None: absent);
    and the sums of value v's voxel indices along each axis at row v of a (top + 1, 3) array.
    """
    counts = np.zeros(int(np.iinfo(data.dtype).max) + 1, dtype=np.int64)
    low = np.full((top + 1, 3), np.iinfo(np.int64).max, dtype=np.int64)
    high = np.full((top + 1, 3), -1, dtype=np.int64)
    sums = np.zeros((top + 1, 3), dtype=np.int64)
    _stats_kernel(data, top, counts, low, high, sums)
    values = np.flatnonzero(counts)
    found = dict(zip(values.tolist(), counts[values].tolist(), strict=True))
    boxes = [
        None
        if high[row, 0] < 0
        else tuple(slice(int(low[row, axis]), int(high[row, axis]) + 1) for axis in range(3))
        for row in range(top + 1)
    ]
    return found, boxes, sums
