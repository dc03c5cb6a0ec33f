"""Sampling one crop from the source voxels: CT trilinear, labels nearest-neighbour.

A crop voxel (i, j, k) reads the source at coordinates
    c = to_voxel[:3, 3] + to_voxel[:3, 0]·i + to_voxel[:3, 1]·j + to_voxel[:3, 2]·k
(`to_voxel`: crop index → source voxel index, the composed affine of `geometry.cut_crop`).

The rule is `scipy.ndimage.map_coordinates(…, order=1 or 0, mode="nearest")` at those
coordinates, and that is the reference (`reference_ct`, `reference_labels`; also what runs
where numba is missing). The default path computes the same numbers voxel by voxel in one
compiled loop (numba) over the source voxels where they lie (crop axis 0 innermost,
walking a NIfTI volume's fastest axis), without the (3, 96, 96, 96) coordinate array, the
float temporaries or a copy of the voxels, and 2–3× faster per crop. It reproduces scipy's arithmetic operation for operation, so the crops are
bit-identical (tested):
- coordinates summed left to right, as numpy broadcasting sums them;
- linear weights as scipy's spline weights of order 1: w0 = 1 − (c − ⌊c⌋), w1 = 1 − w0;
- the 8 neighbours in C order (last axis fastest), each value times w_axis0 · w_axis1 ·
  w_axis2 in that order, added to a running sum from 0.0; indices outside the volume are
  clamped to its border ("nearest"); nearest-neighbour reads index ⌊c + ½⌋;
- then as `cut_crop` did: scaled sources (slope, intercept) scaled in float64 and cast to
  float32 (unscaled: the float64 sum cast to float32), voxels outside the scan (a
  coordinate beyond the source voxels' extent by more than half a voxel) set to −1024 HU,
  rounded half to even, clipped to int16.
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy import ndimage

try:
    import numba
except ImportError:  # a core dependency; without it the reference path is used (slower)
    numba = None

# Crop voxels outside the scan: air.
AIR_HU = -1024
INT16_MIN, INT16_MAX = -32768, 32767


def crop_coordinates(to_voxel: np.ndarray, size: int) -> np.ndarray:
    """Source voxel coordinates (3, size, size, size) of every crop voxel (the reference's)."""
    linear, offset = to_voxel[:3, :3], to_voxel[:3, 3]
    index = np.arange(size, dtype=np.float64)
    coords = np.empty((3, size, size, size), dtype=np.float64)
    for c in range(3):
        coords[c] = (
            offset[c]
            + linear[c, 0] * index[:, None, None]
            + linear[c, 1] * index[None, :, None]
            + linear[c, 2] * index[None, None, :]
        )
    return coords


def _inside(coords: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Crop voxels within the source voxels' extent (half a voxel beyond the outer centres)."""
    extent = np.array(shape, dtype=np.float64).reshape(3, *([1] * (coords.ndim - 1)))
    return np.all((coords >= -0.5) & (coords <= extent - 0.5), axis=0)


def _block(coords: np.ndarray, shape: tuple[int, ...]) -> tuple[tuple[slice, ...], np.ndarray]:
    """The block of source voxels sampling at `coords` reads (⌊c⌋ and ⌊c⌋ + 1, clamped) and
    its first index; shifting coordinates by an integer no larger than them is exact."""
    low = np.floor(coords.reshape(3, -1).min(axis=1)).astype(np.int64)
    high = np.floor(coords.reshape(3, -1).max(axis=1)).astype(np.int64) + 2
    first = np.clip(low, 0, np.array(shape) - 1)
    last = np.clip(high, first + 1, np.array(shape))
    return tuple(slice(int(a), int(b)) for a, b in zip(first, last, strict=True)), first


def _copy_block(data: np.ndarray, block: tuple[slice, ...]) -> np.ndarray:
    """`data[block]` as a C-order array: copied in stored order first (long runs), then into
    C order, faster than gathering the block across the large volume in sampling order."""
    return np.ascontiguousarray(np.array(data[block], order="K"))


def _map(data: np.ndarray, coords: np.ndarray, order: int, output) -> np.ndarray:
    """`map_coordinates` of `data` at `coords`, on the small block they read (same bits)."""
    block, first = _block(coords, data.shape)
    voxels = _copy_block(data, block)
    shifted = coords - first.reshape(3, *([1] * (coords.ndim - 1))).astype(np.float64)
    return ndimage.map_coordinates(voxels, shifted, order=order, mode="nearest", output=output)


def reference_ct(
    data: np.ndarray, to_voxel: np.ndarray, size: int, slope: float, intercept: float, scaled: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The CT crop (int16, HU) and its inside-the-scan mask, through scipy."""
    coords = crop_coordinates(to_voxel, size)
    inside = _inside(coords, data.shape)
    if scaled:
        hu = (_map(data, coords, 1, np.float64) * slope + intercept).astype(np.float32)
    else:
        hu = _map(data, coords, 1, np.float32)
    hu[~inside] = AIR_HU
    return np.clip(np.rint(hu), INT16_MIN, INT16_MAX).astype(np.int16), inside


def reference_labels(
    data: np.ndarray, to_voxel: np.ndarray, size: int, window: tuple[slice, slice, slice]
) -> np.ndarray:
    """The label values at the crop voxels of `window` (nearest neighbour), through scipy."""
    coords = crop_coordinates(to_voxel, size)[(slice(None), *window)]
    if not coords[0].size:
        return np.zeros(coords.shape[1:], dtype=data.dtype)
    return _map(data, coords, 0, data.dtype)


if numba is not None:

    @numba.njit(cache=True, nogil=True, inline="always")
    def _coordinate(m, axis, fi, fj, fk):
        """Source coordinate `axis` of crop voxel (fi, fj, fk), summed as `crop_coordinates`."""
        c = m[axis, 3] + m[axis, 0] * fi
        c = c + m[axis, 1] * fj
        return c + m[axis, 2] * fk

    @numba.njit(cache=True, nogil=True, inline="always")
    def _ct_voxel(block, first, shape, c0, c1, c2, scaled, slope, intercept, within_scan):
        """One crop voxel at source coordinates (c0, c1, c2): its HU and whether it is inside."""
        nx, ny, nz = shape[0], shape[1], shape[2]
        within = within_scan or (
            -0.5 <= c0 <= nx - 0.5 and -0.5 <= c1 <= ny - 0.5 and -0.5 <= c2 <= nz - 0.5
        )
        f0, f1, f2 = np.floor(c0), np.floor(c1), np.floor(c2)
        w00 = 1.0 - (c0 - f0)
        w01 = 1.0 - w00
        w10 = 1.0 - (c1 - f1)
        w11 = 1.0 - w10
        w20 = 1.0 - (c2 - f2)
        w21 = 1.0 - w20
        x0, y0, z0 = int(f0), int(f1), int(f2)
        x1, y1, z1 = x0 + 1, y0 + 1, z0 + 1
        if not within_scan:
            x0, x1 = min(max(x0, 0), nx - 1), min(max(x1, 0), nx - 1)
            y0, y1 = min(max(y0, 0), ny - 1), min(max(y1, 0), ny - 1)
            z0, z1 = min(max(z0, 0), nz - 1), min(max(z1, 0), nz - 1)
        x0, x1, y0, y1 = x0 - first[0], x1 - first[0], y0 - first[1], y1 - first[1]
        z0, z1 = z0 - first[2], z1 - first[2]
        t = 0.0
        t += float(block[x0, y0, z0]) * w00 * w10 * w20
        t += float(block[x0, y0, z1]) * w00 * w10 * w21
        t += float(block[x0, y1, z0]) * w00 * w11 * w20
        t += float(block[x0, y1, z1]) * w00 * w11 * w21
        t += float(block[x1, y0, z0]) * w01 * w10 * w20
        t += float(block[x1, y0, z1]) * w01 * w10 * w21
        t += float(block[x1, y1, z0]) * w01 * w11 * w20
        t += float(block[x1, y1, z1]) * w01 * w11 * w21
        if scaled:
            value = np.float32(t * slope + intercept)
        else:
            value = np.float32(t)
        if not within:
            value = np.float32(AIR_HU)
        value = np.rint(value)
        value = min(max(value, np.float32(INT16_MIN)), np.float32(INT16_MAX))
        return np.int16(value), within

    @numba.njit(cache=True, nogil=True)
    def _ct_kernel(
        block,
        first,
        shape,
        to_voxel,
        scaled,
        slope,
        intercept,
        within_scan,
        axis0_inner,
        out,
        inside,
    ):
        # `block`: the source voxels from index `first` on (all a crop reads), `shape`: the
        # whole source's; indices are clamped to the whole source, then read in the block.
        # `within_scan`: every neighbour the crop reads lies inside the source, so that no
        # index needs clamping and every voxel is inside (the same numbers, less work).
        # `axis0_inner`: crop axis 0 runs innermost (else axis 2), following the block's
        # fastest axis in memory.
        size = out.shape[0]
        m = to_voxel
        # Coordinates summed as `_coordinate` sums them: (m·3 + m·0 i) + m·1 j, then + m·2 k,
        # each term computed once.
        start = np.empty((3, size))
        for i in range(size):
            for axis in range(3):
                start[axis, i] = m[axis, 3] + m[axis, 0] * float(i)
        if axis0_inner:
            for j in range(size):
                q0, q1, q2 = m[0, 1] * float(j), m[1, 1] * float(j), m[2, 1] * float(j)
                for k in range(size):
                    r0, r1, r2 = m[0, 2] * float(k), m[1, 2] * float(k), m[2, 2] * float(k)
                    for i in range(size):
                        out[i, j, k], inside[i, j, k] = _ct_voxel(
                            block,
                            first,
                            shape,
                            (start[0, i] + q0) + r0,
                            (start[1, i] + q1) + r1,
                            (start[2, i] + q2) + r2,
                            scaled,
                            slope,
                            intercept,
                            within_scan,
                        )
        else:
            for i in range(size):
                for j in range(size):
                    q0 = start[0, i] + m[0, 1] * float(j)
                    q1 = start[1, i] + m[1, 1] * float(j)
                    q2 = start[2, i] + m[2, 1] * float(j)
                    for k in range(size):
                        out[i, j, k], inside[i, j, k] = _ct_voxel(
                            block,
                            first,
                            shape,
                            q0 + m[0, 2] * float(k),
                            q1 + m[1, 2] * float(k),
                            q2 + m[2, 2] * float(k),
                            scaled,
                            slope,
                            intercept,
                            within_scan,
                        )

    @numba.njit(cache=True, nogil=True, inline="always")
    def _label_voxel(data, m, fi, fj, fk):
        """The label nearest to crop voxel (fi, fj, fk)."""
        nx, ny, nz = data.shape
        x = min(max(int(np.floor(_coordinate(m, 0, fi, fj, fk) + 0.5)), 0), nx - 1)
        y = min(max(int(np.floor(_coordinate(m, 1, fi, fj, fk) + 0.5)), 0), ny - 1)
        z = min(max(int(np.floor(_coordinate(m, 2, fi, fj, fk) + 0.5)), 0), nz - 1)
        return data[x, y, z]

    @numba.njit(cache=True, nogil=True)
    def _label_kernel(data, m, start, axis0_inner, out):
        # The crop voxels of the window from index `start` on, crop axis 0 or 2 innermost
        # (as in `_ct_kernel`).
        n0, n1, n2 = out.shape
        s0, s1, s2 = start[0], start[1], start[2]
        if axis0_inner:
            for j in range(n1):
                for k in range(n2):
                    for i in range(n0):
                        out[i, j, k] = _label_voxel(
                            data, m, float(s0 + i), float(s1 + j), float(s2 + k)
                        )
        else:
            for i in range(n0):
                for j in range(n1):
                    for k in range(n2):
                        out[i, j, k] = _label_voxel(
                            data, m, float(s0 + i), float(s1 + j), float(s2 + k)
                        )


def sample_ct(
    data: np.ndarray, to_voxel: np.ndarray, size: int, slope: float, intercept: float, scaled: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The CT crop (int16, HU, size³) and its inside-the-scan mask (bool, size³)."""
    if numba is None:
        return reference_ct(data, to_voxel, size, slope, intercept, scaled)
    out = np.empty((size, size, size), dtype=np.int16)
    inside = np.empty((size, size, size), dtype=np.bool_)
    matrix = np.ascontiguousarray(to_voxel, dtype=np.float64)
    shape = np.array(data.shape, dtype=np.int64)
    # The crop's coordinates lie within those around its corners (the map is linear).
    corners = _corner_coordinates(matrix, size)
    within_scan = bool(
        np.all(corners.min(axis=1) >= 0) and np.all(corners.max(axis=1) <= shape - 2)
    )
    fastest = _fastest_axis(data)
    if fastest != 1:
        # The loop runs along the source's fastest axis (axis 0, a NIfTI volume's left → right,
        # or axis 2) innermost: it reads the voxels in place.
        voxels, first = data, np.zeros(3, dtype=np.int64)
    else:
        block, first = _block(corners, data.shape)
        voxels = _copy_block(data, block)  # in the crop's axis order
    _ct_kernel(
        voxels,
        first,
        shape,
        matrix,
        bool(scaled),
        float(slope),
        float(intercept),
        within_scan,
        fastest == 0,
        out,
        inside,
    )
    return out, inside


def _fastest_axis(data: np.ndarray) -> int:
    """The axis of `data` whose neighbours lie closest in memory."""
    return int(np.argmin([abs(stride) for stride in data.strides]))


def _corner_coordinates(to_voxel: np.ndarray, size: int) -> np.ndarray:
    """Source coordinates (3, 16) around the crop's 8 corners, one voxel wider on every side:
    every coordinate of the crop lies within them (the map is linear), with room for rounding."""
    corners = np.array(list(itertools.product((0, size - 1), repeat=3)), dtype=np.float64)
    coords = (corners @ to_voxel[:3, :3].T + to_voxel[:3, 3]).T
    return np.concatenate([coords - 1.0, coords + 1.0], axis=1)


def sample_labels(
    data: np.ndarray, to_voxel: np.ndarray, size: int, window: tuple[slice, slice, slice]
) -> np.ndarray:
    """The label values at the crop voxels of `window` (nearest neighbour)."""
    if numba is None:
        return reference_labels(data, to_voxel, size, window)
    out = np.empty(tuple(w.stop - w.start for w in window), dtype=data.dtype)
    if out.size:
        start = np.array([w.start for w in window], dtype=np.int64)
        matrix = np.ascontiguousarray(to_voxel, dtype=np.float64)
        _label_kernel(data, matrix, start, _fastest_axis(data) == 0, out)
    return out
