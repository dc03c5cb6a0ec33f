"""Synthetic spine CT phantoms with VerSe label maps and fracture grades.

No public CT can be downloaded at run time, so demos, tests and benchmarks use
these phantoms. Each case is a short run of consecutive vertebrae (T5 … L5) on a
gently curved centre line, drawn in HU: vertebral bodies with a cortical shell
and trabecular core, posterior elements (pedicles, lamina, spinous and
transverse processes), discs, spinal canal, soft tissue, subcutaneous fat and
air, blurred by a sub-millimetre point spread, plus Gaussian noise. Vertebrae
may carry a Genant grade 1–3 compression fracture (wedge, biconcave or crush
loss of anterior/middle body height); the end vertebrae of a spine never do, and
the field of view always cuts through them, so no whole vertebra is an end one.

`write_phantoms` writes the cases of a `SynthConfig` (`vctmae synth`); `make_phantom` draws
one case in memory.

Every case is drawn on a grid aligned with RAS+ world axes, then stored in a
varying axis order (RAS, LPS, PIR, …) with a varying, often anisotropic voxel
spacing; the NIfTI affine always describes the same anatomy, so a reader that
honours the affine (ingest reorients to canonical) recovers it.

Determinism: a case depends only on (seed, patient, scan index), and files are
gzip-compressed with mtime 0, so the same seed gives byte-identical files.
"""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform
from scipy import ndimage

from vctmae.errors import UsageError, VctmaeError
from vctmae.files import write_atomically
from vctmae.ingest.levels import LEVELS, VERSE_LABEL
from vctmae.synth import SynthConfig

# Storage axis orders cycled over cases: scanner-style (LPS), neurological (RAS),
# radiological (LAS), and axis permutations as written by other tools.
ORIENTATIONS: tuple[str, ...] = ("LPS", "RAS", "PIR", "LAS", "ASL", "LPI", "SRA", "IRP")
_AXIS_OF = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}  # axis code → world axis

# Levels a phantom spine may cover, head to feet (no T13 variant); a spine starts within T6..L2.
SPINE_LEVELS: tuple[str, ...] = (*(f"T{i}" for i in range(6, 13)), *(f"L{i}" for i in range(1, 6)))
_FIRST_START, _LAST_START = "T6", "L2"
_WITH_ENDS = ("T5", *SPINE_LEVELS)  # with the end vertebra above a spine starting at T6
# Clinical-size phantoms (`clinical=True`): a longer spine, C7 … L5 with its end vertebrae,
# 12–14 vertebrae between them, on a scanner's grid of 512 × 512 slices of ~0.7 × 0.7 mm, ~1 mm apart.
CLINICAL_LEVELS: tuple[str, ...] = (
    "C7",
    *(f"T{i}" for i in range(1, 13)),
    *(f"L{i}" for i in range(1, 6)),
)
CLINICAL_VERTEBRAE = (10, 13)  # inner vertebrae drawn from [10, 13): 12–14 with the end ones
CLINICAL_GRID = 512  # voxels across each slice

# Genant grade → fraction of anterior/middle body height lost.
GRADE_LOSS: dict[int, tuple[float, float]] = {1: (0.20, 0.25), 2: (0.26, 0.39), 3: (0.41, 0.55)}
FRACTURE_SHAPES: tuple[str, ...] = ("wedge", "biconcave", "crush")


class OutFolderInUseError(VctmaeError, FileExistsError):
    """`write_phantoms`' folder already holds case files this run would not write."""


MAX_VOXELS = 6_000_000
GZIP_LEVEL = 1  # noise compresses poorly anyway; level 1 is several times faster than 6


@dataclass(frozen=True, kw_only=True)
class Phantom:
    """One synthetic case in memory, arrays in storage order (as they would be written)."""

    case: str
    patient: str
    ct: np.ndarray  # int16 HU
    seg: np.ndarray  # uint8 VerSe labels
    affine: np.ndarray  # (4, 4) voxel index → world mm (RAS+)
    grades: dict[str, int]  # level → Genant grade, every vertebra present in `seg`
    shapes: dict[str, str]  # level → "none" | "wedge" | "biconcave" | "crush"
    orientation: str  # storage axis codes, e.g. "LPS"
    spacing: tuple[float, float, float]  # mm per storage axis
    ct_intercept: float = 0.0  # files store ct - intercept (uint16) when nonzero

    @property
    def levels(self) -> list[str]:
        """Vertebra levels present in the label map, head to feet."""
        return sorted(self.grades, key=LEVELS.index)


@dataclass(frozen=True, kw_only=True)
class _Vertebra:
    """Anatomy of one vertebra in its local frame (mm): u → patient right, v → anterior, w → superior."""

    level: str
    height: float  # intact body height
    half_width: float  # body semi-axis left–right
    half_depth: float  # body semi-axis anterior–posterior
    disc_above: float
    grade: int
    shape: str
    loss: float  # fraction of height lost at the fracture's deepest point
    wedge: float  # natural (grade 0) anterior wedging fraction
    concavity: float  # natural endplate concavity, mm
    trabecular_hu: float
    posterior_hu: float
    canal_half_width: float
    canal_half_depth: float
    pedicle_width: float
    lamina_thickness: float
    spinous_length: float
    spinous_slope: float  # radians, downward
    spinous_height: float
    transverse_length: float
    axial_rotation: float  # radians


@dataclass(frozen=True, kw_only=True)
class _Anatomy:
    """Patient-level anatomy, shared by every scan of the patient."""

    vertebrae: list[_Vertebra]
    tilt_sagittal: tuple[float, float]  # start angle, total change (radians)
    tilt_coronal: tuple[float, float]
    cortical_hu: float
    disc_hu: float
    soft_hu: float
    fat_hu: float
    canal_hu: float
    skin_gap: float  # skin lies this far behind the most posterior spinous tip, mm
    body_semi_axes: tuple[float, float]
    fat_thickness: float
    # Fat/organ ellipses in front of the spine: dx, dy (from the spine), rx, ry (mm), HU.
    blobs: list[tuple[float, float, float, float, float]] = field(default_factory=list)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def _draw_anatomy(
    rng: np.random.Generator, fracture_rate: float, clinical: bool = False
) -> _Anatomy:
    """A spine of 4–7 vertebrae (clinical: 12–14) that may fracture, between two end
    vertebrae that never do.

    The scan always cuts through the two end vertebrae (see `_draw_scan`), so ingest drops
    them and every whole vertebra has both neighbours in view. The end vertebrae are drawn
    after everything else, so they change nothing about the rest of the spine.
    """
    if clinical:
        count = int(rng.integers(*CLINICAL_VERTEBRAE))
        # Room for an end vertebra at either end of CLINICAL_LEVELS.
        start = int(rng.integers(1, len(CLINICAL_LEVELS) - count))
        levels = CLINICAL_LEVELS[start : start + count]
    else:
        count = int(rng.integers(4, 8))
        lo, hi = SPINE_LEVELS.index(_FIRST_START), SPINE_LEVELS.index(_LAST_START)
        hi = min(hi, len(SPINE_LEVELS) - count - 1)  # room for the end vertebra below
        start = int(rng.integers(lo, hi + 1))
        levels = SPINE_LEVELS[start : start + count]
    size_scale = rng.uniform(0.9, 1.1)
    trabecular = rng.uniform(150, 250)
    concavity = rng.uniform(0.4, 1.4)  # natural endplate concavity, mm

    def vertebra(level: str, may_fracture: bool) -> _Vertebra:
        lumbar = level.startswith("L")
        rank = CLINICAL_LEVELS.index(level) - CLINICAL_LEVELS.index("T6")  # -1 = T5 … 11 = L5
        height = (19.0 + 0.75 * rank) * size_scale * rng.uniform(0.975, 1.025)
        half_width = (16.0 + 1.1 * rank) * size_scale * rng.uniform(0.96, 1.04)
        half_depth = (12.5 + 0.5 * rank) * size_scale * rng.uniform(0.96, 1.04)
        # Draw the fracture whether or not it happens, so that `fracture_rate` changes
        # which vertebrae break and nothing else about the spine.
        chance = rng.random()
        grade = int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
        shape = str(rng.choice(FRACTURE_SHAPES, p=[0.5, 0.3, 0.2]))
        loss = rng.uniform(*GRADE_LOSS[grade])
        if not (may_fracture and chance < fracture_rate):
            grade, shape, loss = 0, "none", 0.0
        return _Vertebra(
            level=level,
            height=height,
            half_width=half_width,
            half_depth=half_depth,
            disc_above=(4.0 + 0.45 * rank) * rng.uniform(0.85, 1.15),
            grade=grade,
            shape=shape,
            loss=loss,
            wedge=rng.uniform(0.0, 0.04 if not lumbar else 0.02),
            concavity=concavity * rng.uniform(0.9, 1.1),
            trabecular_hu=trabecular + rng.normal(0, 15) + (rng.uniform(20, 70) if grade else 0.0),
            posterior_hu=rng.uniform(380, 520),
            canal_half_width=rng.uniform(8.0, 10.5) + (1.5 if lumbar else 0.0),
            canal_half_depth=rng.uniform(6.5, 8.5),
            pedicle_width=rng.uniform(5.5, 8.0) + (1.5 if lumbar else 0.0),
            lamina_thickness=rng.uniform(4.0, 6.0),
            spinous_length=rng.uniform(24, 32),
            spinous_slope=np.radians(rng.uniform(5, 15) if lumbar else rng.uniform(30, 45)),
            spinous_height=(rng.uniform(14, 20) if lumbar else rng.uniform(7, 10)),
            transverse_length=(rng.uniform(16, 24) if lumbar else rng.uniform(10, 16)),
            axial_rotation=np.radians(rng.uniform(-3, 3)),
        )

    vertebrae = [vertebra(level, may_fracture=True) for level in levels]
    blobs = [
        (rng.uniform(-60, 60), rng.uniform(35, 90), rng.uniform(8, 25), rng.uniform(8, 20),
         float(rng.choice([rng.uniform(-120, -80), rng.uniform(30, 60)])))
        for _ in range(int(rng.integers(2, 6)))
    ]  # fmt: skip
    drawn = dict(
        tilt_sagittal=(np.radians(rng.uniform(-8, 8)), np.radians(rng.uniform(-12, 12))),
        tilt_coronal=(np.radians(rng.uniform(-4, 4)), np.radians(rng.uniform(-6, 6))),
        cortical_hu=rng.uniform(620, 780),
        disc_hu=rng.uniform(70, 95),
        soft_hu=rng.uniform(30, 55),
        fat_hu=rng.uniform(-120, -80),
        canal_hu=rng.uniform(10, 30),
        skin_gap=rng.uniform(15, 35),
        body_semi_axes=(rng.uniform(140, 180), rng.uniform(100, 130)),
        fat_thickness=rng.uniform(8, 25),
    )
    chain = CLINICAL_LEVELS if clinical else _WITH_ENDS
    above = vertebra(chain[chain.index(levels[0]) - 1], may_fracture=False)
    below = vertebra(chain[chain.index(levels[-1]) + 1], may_fracture=False)
    return _Anatomy(vertebrae=[above, *vertebrae, below], blobs=blobs, **drawn)


def _centre_line(anatomy: _Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """Body centres (n, 3) and unit tangents pointing inferior (n, 3), world mm, spine top at z = 0."""
    verts = anatomy.vertebrae
    positions = [verts[0].disc_above / 2 + verts[0].height / 2]
    for above, below in zip(verts[:-1], verts[1:], strict=True):
        positions.append(positions[-1] + above.height / 2 + below.disc_above + below.height / 2)
    length = positions[-1] + verts[-1].height
    s = np.arange(0.0, length + 0.5, 0.5)
    frac = s / length - 0.5
    sag = anatomy.tilt_sagittal[0] + anatomy.tilt_sagittal[1] * frac
    cor = anatomy.tilt_coronal[0] + anatomy.tilt_coronal[1] * np.sin(np.pi * frac)
    tangent = np.stack([np.tan(cor), np.tan(sag), -np.ones_like(s)], axis=1)
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    path = np.concatenate(
        [np.zeros((1, 3)), np.cumsum((tangent[1:] + tangent[:-1]) / 2 * 0.5, axis=0)]
    )
    centres = np.stack([np.interp(positions, s, path[:, k]) for k in range(3)], axis=1)
    tangents = np.stack([np.interp(positions, s, tangent[:, k]) for k in range(3)], axis=1)
    tangents /= np.linalg.norm(tangents, axis=1, keepdims=True)
    return centres, tangents


def _frame(tangent: np.ndarray, rotation: float) -> np.ndarray:
    """Rows: local right, anterior, superior unit vectors in world (RAS+) coordinates."""
    superior = -tangent
    anterior = np.array([0.0, 1.0, 0.0]) - superior[1] * superior
    anterior /= np.linalg.norm(anterior)
    right = np.cross(anterior, superior)
    c, s = np.cos(rotation), np.sin(rotation)
    right, anterior = c * right + s * anterior, -s * right + c * anterior
    return np.stack([right, anterior, superior])


@dataclass(frozen=True)
class _LocalBox:
    """Local coordinates (mm, float32) of the grid voxels covering a box of a vertebra's frame."""

    region: tuple[slice, slice, slice]  # into the RAS grid
    u: np.ndarray  # → patient right
    v: np.ndarray  # → anterior
    w: np.ndarray  # → superior


def _local_box(
    axes: tuple[np.ndarray, np.ndarray, np.ndarray],
    centre: np.ndarray,
    frame: np.ndarray,
    ranges: tuple[tuple[float, float], tuple[float, float], tuple[float, float]],
) -> _LocalBox | None:
    """The grid's voxels whose world box contains the local box `ranges` (u, v, w), or None if outside."""
    corners = np.array(np.meshgrid(*ranges, indexing="ij")).reshape(3, -1)
    world = centre[:, None] + frame.T @ corners
    region = []
    for k in range(3):
        lo, hi = np.searchsorted(axes[k], [world[k].min() - 1.0, world[k].max() + 1.0])
        region.append(slice(int(lo), int(hi)))
    if any(r.stop <= r.start for r in region):
        return None
    x = (axes[0][region[0]] - centre[0]).astype(np.float32)[:, None, None]
    y = (axes[1][region[1]] - centre[1]).astype(np.float32)[None, :, None]
    z = (axes[2][region[2]] - centre[2]).astype(np.float32)[None, None, :]
    f = frame.astype(np.float32)
    u, v, w = (f[k, 0] * x + f[k, 1] * y + f[k, 2] * z for k in range(3))
    return _LocalBox(tuple(region), u, v, w)


def _paint_vertebra(
    ct: np.ndarray,
    seg: np.ndarray,
    axes: tuple[np.ndarray, np.ndarray, np.ndarray],
    centre: np.ndarray,
    frame: np.ndarray,
    vert: _Vertebra,
    disc_below: float,
    anatomy: _Anatomy,
) -> None:
    """Paint one vertebra, its canal segment and its half-discs into `ct`/`seg` (RAS grid).

    Each part is evaluated only in its own small box; posterior elements first, then
    disc and body, so the body wins where parts touch. Other vertebrae's bone is kept
    (discs and canal only fill voxels no vertebra claims yet).
    """
    label = VERSE_LABEL[vert.level]
    a, b, half = vert.half_width, vert.half_depth, vert.height / 2
    slab = (-half - disc_below / 2, half + vert.disc_above / 2)
    canal_v = -0.8 * b - vert.canal_half_depth
    cu, cv, lt = vert.canal_half_width, vert.canal_half_depth, vert.lamina_thickness
    pedicle_w = 0.15 * vert.height
    reach = cu + vert.pedicle_width

    def paint(box: _LocalBox, bone: np.ndarray, hu: float | np.ndarray) -> None:
        ct[box.region][bone] = hu
        seg[box.region][bone] = label

    # Canal (CSF/cord), pedicles and the lamina ring around the canal.
    box = _local_box(
        axes, centre, frame, ((-reach - lt, reach + lt), (canal_v - cv - lt, -0.8 * b + 1), slab)
    )
    if box is not None:
        u, v, w = box.u, box.v, box.w
        canal_radial = (u / cu) ** 2 + ((v - canal_v) / cv) ** 2
        canal = (canal_radial < 1.0) & (w >= slab[0]) & (w <= slab[1])
        ct_box, seg_box = ct[box.region], seg[box.region]
        ct_box[canal & (seg_box == 0)] = anatomy.canal_hu
        pedicles = (
            (np.abs(u) >= cu - 1)
            & (np.abs(u) <= reach)
            & (v <= -0.8 * b + 1)
            & (v >= canal_v - 0.3 * cv)
            & (np.abs(w - pedicle_w) <= 0.22 * vert.height)
        )
        lamina = (
            (canal_radial >= 1.0)
            & ((u / (cu + lt)) ** 2 + ((v - canal_v) / (cv + lt)) ** 2 <= 1.0)
            & (v <= canal_v + 2)
            & (np.abs(w) <= 0.4 * vert.height)
        )
        paint(box, (pedicles & ~canal) | lamina, vert.posterior_hu)

    # Spinous process: a plate running back (and, in the thorax, steeply down) from the lamina.
    spine_start = canal_v - cv - lt + 2
    drop = np.tan(vert.spinous_slope) * vert.spinous_length
    box = _local_box(axes, centre, frame, ((-3, 3), (spine_start - vert.spinous_length, spine_start),
                                           (-drop - vert.spinous_height / 2, vert.spinous_height / 2)))  # fmt: skip
    if box is not None:
        along = spine_start - box.v  # mm behind the lamina
        spinous = (
            (along >= 0)
            & (along <= vert.spinous_length)
            & (np.abs(box.u) <= 3.0)
            & (
                np.abs(box.w + np.float32(np.tan(vert.spinous_slope)) * along)
                <= vert.spinous_height / 2
            )
        )
        paint(box, spinous, vert.posterior_hu)

    # Transverse processes: bars reaching out sideways from the pedicles.
    tip = reach + vert.transverse_length
    box = _local_box(
        axes,
        centre,
        frame,
        ((-tip, tip), (canal_v - 4, canal_v + 4), (pedicle_w - 4, pedicle_w + 4)),
    )
    if box is not None:
        transverse = (
            (np.abs(box.u) >= reach - 2)
            & (np.abs(box.u) <= tip)
            & (np.abs(box.v - canal_v) <= 4.0)
            & (np.abs(box.w - pedicle_w) <= 4.0)
        )
        paint(box, transverse, vert.posterior_hu)

    # Vertebral body: elliptic cross-section flattened posteriorly, endplates shaped by the
    # natural concavity and wedging and by the fracture; the half-discs fill the rest of the slab.
    box = _local_box(axes, centre, frame, ((-a, a), (-0.8 * b, b), slab))
    if box is None:
        return
    u, v, w = box.u, box.v, box.w
    radial = (u / a) ** 2 + (v / b) ** 2
    section = (radial <= 1.0) & (v >= -0.8 * b)
    # 0 at the posterior wall → 1 over the front sixth of the body (where Genant measures anterior height)
    anterior = np.clip((v + 0.8 * b) / (1.5 * b), 0.0, 1.0)
    central = np.clip(1.0 - radial, 0.0, 1.0)
    top = half - vert.concavity * central - vert.wedge * vert.height * anterior
    bottom = -half + vert.concavity * central
    if vert.grade:
        lost = vert.loss * vert.height
        if vert.shape == "wedge":
            depth, top_share = lost * anterior, 0.75
        elif vert.shape == "biconcave":
            depth, top_share = lost * central, 0.5
        else:  # crush: whole body lower, more so in front
            depth, top_share = lost * (0.7 + 0.3 * anterior), 0.6
        top = top - top_share * depth
        bottom = bottom + (1.0 - top_share) * depth
    body = section & (w <= top) & (w >= bottom)
    disc = section & ~body & (w >= slab[0]) & (w <= slab[1])
    ct[box.region][disc & (seg[box.region] == 0)] = anatomy.disc_hu
    shell_distance = np.minimum(
        np.minimum((1.0 - np.sqrt(radial[body])) * min(a, b), v[body] + 0.8 * b),
        np.minimum(top[body] - w[body], w[body] - bottom[body]),
    )
    paint(box, body, np.where(shell_distance < 1.5, anatomy.cortical_hu, vert.trabecular_hu))


def _paint_spine(
    ct: np.ndarray,
    seg: np.ndarray,
    axes: tuple[np.ndarray, np.ndarray, np.ndarray],
    anatomy: _Anatomy,
) -> None:
    """Paint every vertebra of `anatomy`, head to feet, into `ct`/`seg` on the grid `axes`."""
    centres, tangents = _centre_line(anatomy)
    verts = anatomy.vertebrae
    for i, vert in enumerate(verts):
        disc_below = verts[i + 1].disc_above if i + 1 < len(verts) else vert.disc_above
        frame = _frame(tangents[i], vert.axial_rotation)
        _paint_vertebra(ct, seg, axes, centres[i], frame, vert, disc_below, anatomy)


@dataclass(frozen=True, kw_only=True)
class _Scan:
    """One acquisition of an anatomy: field of view, voxel grid, storage order, noise."""

    spacing: tuple[float, float, float]  # mm along RAS x, y, z
    orientation: str
    lo: tuple[float, float, float]  # field of view in the spine's frame (spine top at z = 0), mm
    hi: tuple[float, float, float]
    skin: float  # y of the back's skin (posterior end of the torso outline)
    origin: tuple[float, float, float]  # scanner offset added to the spine frame
    noise: float  # HU, standard deviation
    blur: float  # mm, standard deviation of the point spread
    grid: tuple[int, int, int] | None = None  # voxels along x, y, z; None: from lo, hi, spacing


def _landmarks(vert: _Vertebra) -> np.ndarray:
    """Extreme points (3, N) of the vertebra's mask in its local frame (u, v, w)."""
    a, b, half = vert.half_width, vert.half_depth, vert.height / 2
    canal_v = -0.8 * b - vert.canal_half_depth
    spine_start = canal_v - vert.canal_half_depth - vert.lamina_thickness + 2
    drop = np.tan(vert.spinous_slope) * vert.spinous_length
    tip = vert.canal_half_width + vert.pedicle_width + vert.transverse_length
    points = [(su * a, sv, sw * half) for su in (-1, 1) for sv in (b, -0.8 * b) for sw in (-1, 1)]
    points += [(0.0, sv, sw) for sv, sw in (
        (spine_start, vert.spinous_height / 2), (spine_start, -vert.spinous_height / 2),
        (spine_start - vert.spinous_length, -drop + vert.spinous_height / 2),
        (spine_start - vert.spinous_length, -drop - vert.spinous_height / 2),
    )]  # fmt: skip
    points += [(su * tip, canal_v + sv, 0.15 * vert.height + sw)
               for su in (-1, 1) for sv in (-4, 4) for sw in (-4, 4)]  # fmt: skip
    return np.array(points).T


def _bone_extremes(anatomy: _Anatomy) -> list[np.ndarray]:
    """World positions (3, N) of each vertebra's extreme points (`_landmarks`), head to feet."""
    centres, tangents = _centre_line(anatomy)
    return [
        centres[i][:, None] + _frame(tangents[i], vert.axial_rotation).T @ _landmarks(vert)
        for i, vert in enumerate(anatomy.vertebrae)
    ]


def _draw_scan(
    rng: np.random.Generator,
    anatomy: _Anatomy,
    orientation: str | None,
    spacing: float | Sequence[float] | None,
    clinical: bool = False,
) -> _Scan:
    """Field of view around the spine's bone, spacing within the voxel budget, storage order.

    Clinical: the scanner's field of view instead, 512 × 512 voxels of ~0.7 mm across the
    whole torso, slices ~1 mm apart from one end vertebra to the other.
    """
    extremes = _bone_extremes(anatomy)
    bone = np.concatenate(extremes, axis=1)
    # Top/bottom: the field of view cuts through both end vertebrae (ingest drops them as
    # truncated), as scans do, so every whole vertebra has both neighbours in view. With the
    # end vertebrae whole and a margin of soft tissue and air past them, "nothing above or
    # below" marked exactly the vertebrae that never fracture: a shortcut the classifier
    # learnt instead of the fractures.
    margins = [
        rng.uniform(-0.45, -0.1) * vert.height
        for vert in (anatomy.vertebrae[0], anatomy.vertebrae[-1])
    ]
    skin = bone[1].min() - anatomy.skin_gap
    lo = (
        bone[0].min() - rng.uniform(3, 12),
        skin - rng.uniform(-anatomy.skin_gap / 2, 15),
        extremes[-1][2].min() - margins[1],
    )
    hi = (
        bone[0].max() + rng.uniform(3, 12),
        bone[1].max() + rng.uniform(35, 55),
        extremes[0][2].max() + margins[0],
    )
    volume = float(np.prod(np.subtract(hi, lo)))
    # Draw everything even when overridden, so an override changes nothing else.
    for _ in range(50):
        in_plane, slices = rng.uniform(0.7, 1.5), rng.uniform(0.7, 1.5)
        steps = (in_plane, in_plane, slices)
        if rng.random() < 0.25:  # sagittal or coronal acquisitions
            steps = (
                (slices, in_plane, in_plane) if rng.random() < 0.5 else (in_plane, slices, in_plane)
            )
        if volume / np.prod(steps) <= MAX_VOXELS:
            break
    drawn_orientation = ORIENTATIONS[int(rng.integers(len(ORIENTATIONS)))]
    if spacing is not None:
        steps = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, dtype=float), (3,)))
        if min(steps) <= 0:
            raise ValueError(f"spacing must be positive, got {spacing}")
    orientation = orientation or drawn_orientation
    grid = None
    if clinical:
        # Reconstruction field of view: the torso's width plus a margin, centred on it.
        in_plane = round(
            float(np.clip((2 * anatomy.body_semi_axes[0] + 20) / CLINICAL_GRID, 0.6, 0.8)), 4
        )
        slices = round(float(rng.uniform(1.0, 1.2)), 4) if spacing is None else steps[2]
        steps = (in_plane, in_plane, slices)
        width = in_plane * (CLINICAL_GRID - 1)
        torso_y = skin + anatomy.body_semi_axes[1]
        x_mid = float(np.mean(bone[0]))
        lo = (x_mid - width / 2, torso_y - width / 2, lo[2])
        hi = (x_mid + width / 2, torso_y + width / 2, hi[2])
        grid = (CLINICAL_GRID, CLINICAL_GRID, int(np.floor((hi[2] - lo[2]) / slices)) + 1)
    return _Scan(
        spacing=tuple(round(float(s), 4) for s in steps),
        orientation=orientation,
        lo=tuple(float(x) for x in lo),
        hi=tuple(float(x) for x in hi),
        skin=float(skin),
        origin=(rng.uniform(-40, 40), rng.uniform(-60, 20), rng.uniform(-300, 300)),
        noise=rng.uniform(12, 35),
        blur=rng.uniform(0.35, 0.7),
        grid=grid,
    )


def make_phantom(
    seed: int | Sequence[int] = 0,
    *,
    scan: int = 0,
    fracture_rate: float = 0.25,
    case: str = "case000",
    patient: str = "P000",
    orientation: str | None = None,
    spacing: float | Sequence[float] | None = None,
    clinical: bool = False,
) -> Phantom:
    """Build one phantom case in memory.

    `seed` fixes the patient's anatomy (levels, sizes, fractures); `scan` picks one of
    several scans of that anatomy (field of view, spacing, orientation, noise).
    `orientation` (axis codes such as "LPS") and `spacing` (mm, one value or per RAS
    axis x, y, z) override the drawn values. `clinical` draws a clinical-size case:
    12–14 vertebrae on a 512 × 512 × ~300 grid of ~0.7 × 0.7 × 1 mm (≈ 80 M voxels;
    `spacing` then sets only the slice distance).
    """
    if not 0.0 <= fracture_rate <= 1.0:
        raise ValueError(f"fracture_rate must lie in [0, 1], got {fracture_rate}")
    if orientation is not None:
        orientation = orientation.upper()
        if not (
            len(orientation) == 3
            and set(orientation) <= _AXIS_OF.keys()
            and len({_AXIS_OF[c] for c in orientation}) == 3
        ):
            raise ValueError(
                f"orientation must name three different axes, e.g. 'LPS', got {orientation!r}"
            )
    key = [seed] if isinstance(seed, int) else list(seed)
    if any(int(k) < 0 for k in key):
        raise ValueError(f"seed must be non-negative, got {seed}")
    anatomy = _draw_anatomy(_rng(*key), fracture_rate, clinical)
    acquisition = _draw_scan(_rng(*key, 1_000_003, scan), anatomy, orientation, spacing, clinical)
    noise_rng = _rng(*key, 2_000_003, scan)
    ct_ras, seg_ras, affine_ras = _render(anatomy, acquisition, noise_rng)

    present = _present_labels(seg_ras)
    grades = {v.level: v.grade for v in anatomy.vertebrae if VERSE_LABEL[v.level] in present}
    shapes = {v.level: v.shape for v in anatomy.vertebrae if VERSE_LABEL[v.level] in present}

    transform = ornt_transform(
        axcodes2ornt(("R", "A", "S")), axcodes2ornt(tuple(acquisition.orientation))
    )
    affine = affine_ras @ inv_ornt_aff(transform, ct_ras.shape)
    ct = np.ascontiguousarray(apply_orientation(ct_ras, transform))
    seg = np.ascontiguousarray(apply_orientation(seg_ras, transform))
    spacing_stored = tuple(float(s) for s in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)).round(4))
    return Phantom(
        case=case,
        patient=patient,
        ct=ct,
        seg=seg,
        affine=affine,
        grades=grades,
        shapes=shapes,
        orientation=acquisition.orientation,
        spacing=spacing_stored,
    )


def _present_labels(seg: np.ndarray) -> set[int]:
    """Non-zero values of a uint8 label map, counted slab by slab (no full-size int64 copy)."""
    counts = np.zeros(256, dtype=np.int64)
    for k in range(0, seg.shape[2], 16):
        counts += np.bincount(seg[:, :, k : k + 16].ravel(), minlength=256)
    return set(np.flatnonzero(counts).tolist()) - {0}


def _render(
    anatomy: _Anatomy, acq: _Scan, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw the case on a RAS-aligned grid; returns ct (int16), seg (uint8), affine."""
    centres = _centre_line(anatomy)[0]
    lo, step = np.array(acq.lo), np.array(acq.spacing)
    if acq.grid is not None:
        shape = acq.grid
    else:
        shape = tuple(int(n) for n in np.floor((np.array(acq.hi) - lo) / step) + 1)
    axes = tuple(lo[k] + step[k] * np.arange(shape[k]) for k in range(3))

    # Torso: z-invariant elliptic outline behind which lies air, a subcutaneous fat
    # layer, soft tissue, and a few fat/organ blobs in front of the spine.
    x_mid = float(np.mean(centres[:, 0]))
    y_spine = float(np.mean(centres[:, 1]))
    rx, ry = anatomy.body_semi_axes
    dx = (axes[0] - x_mid)[:, None]
    dy = (axes[1] - (acq.skin + ry))[None, :]
    outline = (dx / rx) ** 2 + (dy / ry) ** 2
    t = anatomy.fat_thickness
    inner = (dx / (rx - t)) ** 2 + (dy / (ry - t)) ** 2
    plane = np.full(outline.shape, -1000.0, dtype=np.float32)
    plane[outline <= 1.0] = anatomy.fat_hu
    plane[inner <= 1.0] = anatomy.soft_hu
    for bx, by, brx, bry, hu in anatomy.blobs:
        blob = ((axes[0][:, None] - x_mid - bx) / brx) ** 2 + (
            (axes[1][None, :] - y_spine - by) / bry
        ) ** 2
        plane[blob <= 1.0] = hu
    affine = np.diag([*step, 1.0])
    affine[:3, 3] = lo + np.array(acq.origin)
    if acq.grid is not None:
        ct_int, seg = _render_clinical(anatomy, acq, rng, axes, plane)
        return ct_int, seg, affine
    ct = np.repeat(plane[:, :, None], shape[2], axis=2)
    seg = np.zeros(shape, dtype=np.uint8)
    _paint_spine(ct, seg, axes, anatomy)

    # Scanner blur (point spread, a fraction of a mm), then quantum noise.
    ct = ndimage.gaussian_filter(ct, acq.blur / step, truncate=3.0, output=np.float32)
    ct += rng.standard_normal(shape, dtype=np.float32) * np.float32(acq.noise)
    ct_int = np.clip(np.rint(ct), -1024, 3071).astype(np.int16)
    return ct_int, seg, affine


# Clinical grids: the spine is painted and blurred in a block this far around its bone (mm),
# which holds every part `_paint_vertebra` paints (discs, canal, lamina lie within ~3 mm of
# the landmarks, `_local_box` adds 1 mm).
SPINE_BLOCK_MARGIN_MM = 15.0
X_SLAB = 32  # rows of a clinical grid finished at a time (noise, rounding)


def _render_clinical(
    anatomy: _Anatomy,
    acq: _Scan,
    rng: np.random.Generator,
    axes: tuple[np.ndarray, np.ndarray, np.ndarray],
    plane: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """`_render`'s CT and labels on a clinical grid, without a float copy of the whole grid.

    The same picture as `_render` draws: the blur is linear and the torso does not change
    along z, so the blurred torso is the torso's slice blurred in-plane, and only a block
    around the spine is painted and blurred in 3-D; noise and rounding are applied slab
    by slab (the noise draws are the ones a whole-grid draw gives).
    """
    shape = acq.grid
    step = np.array(acq.spacing)
    sigma = acq.blur / step
    # gaussian_filter's kernel radius is int(truncate · σ + 0.5) voxels.
    radius = max(int(3.0 * s + 0.5) for s in sigma) + 1
    bone = np.concatenate(_bone_extremes(anatomy), axis=1)
    block, inner = [], []
    for k in (0, 1):
        first, last = np.searchsorted(
            axes[k],
            [bone[k].min() - SPINE_BLOCK_MARGIN_MM, bone[k].max() + SPINE_BLOCK_MARGIN_MM],
        )
        start, stop = max(0, int(first) - 2 * radius), min(shape[k], int(last) + 2 * radius)
        block.append(slice(start, stop))
        # Where the block's blur is the whole grid's: `radius` inside its cut edges.
        inner.append(
            slice(radius if start > 0 else 0, (stop - start) - (radius if stop < shape[k] else 0))
        )
    block_axes = (axes[0][block[0]], axes[1][block[1]], axes[2])
    spine = np.repeat(plane[block[0], block[1], None], shape[2], axis=2)
    spine_seg = np.zeros(spine.shape, dtype=np.uint8)
    _paint_spine(spine, spine_seg, block_axes, anatomy)
    seg = np.zeros(shape, dtype=np.uint8)
    seg[block[0], block[1], :] = spine_seg
    spine = ndimage.gaussian_filter(spine, sigma, truncate=3.0, output=np.float32)
    torso = ndimage.gaussian_filter(plane, sigma[:2], truncate=3.0, output=np.float32)
    kept = (
        slice(block[0].start + inner[0].start, block[0].start + inner[0].stop),
        slice(block[1].start + inner[1].start, block[1].start + inner[1].stop),
    )
    ct = np.empty(shape, dtype=np.int16)
    for x0 in range(0, shape[0], X_SLAB):
        x1 = min(x0 + X_SLAB, shape[0])
        slab = np.repeat(torso[x0:x1, :, None], shape[2], axis=2)
        lo_x, hi_x = max(x0, kept[0].start), min(x1, kept[0].stop)
        if lo_x < hi_x:
            offset = block[0].start
            slab[lo_x - x0 : hi_x - x0, kept[1]] = spine[
                lo_x - offset : hi_x - offset,
                kept[1].start - block[1].start : kept[1].stop - block[1].start,
            ]
        slab += rng.standard_normal(slab.shape, dtype=np.float32) * np.float32(acq.noise)
        ct[x0:x1] = np.clip(np.rint(slab), -1024, 3071)
    return ct, seg


def _nifti_image(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    image = nib.Nifti1Image(data, affine)
    image.set_data_dtype(data.dtype)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)  # scanner coordinates, in both qform and sform
    image.set_sform(affine, code=1)
    return image


def phantom_images(phantom: Phantom) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """NIfTI images (ct, seg) of a phantom: int16 HU (or uint16 + scl_inter) and uint8 labels."""
    if phantom.ct_intercept:
        raw = (phantom.ct.astype(np.int32) - int(phantom.ct_intercept)).astype(np.uint16)
        ct_image = _nifti_image(raw, phantom.affine)
        ct_image.header.set_slope_inter(1.0, phantom.ct_intercept)
    else:
        ct_image = _nifti_image(phantom.ct.astype(np.int16, copy=False), phantom.affine)
    return ct_image, _nifti_image(phantom.seg.astype(np.uint8, copy=False), phantom.affine)


def _nifti_gz_bytes(image: nib.Nifti1Image) -> bytes:
    """`.nii.gz` bytes that depend only on the image (gzip mtime 0, no file name)."""
    buffer = io.BytesIO()
    file_map = image.make_file_map({"image": buffer, "header": buffer})
    image.to_file_map(file_map)
    return gzip.compress(buffer.getvalue(), compresslevel=GZIP_LEVEL, mtime=0)


def write_phantom(phantom: Phantom, out: Path) -> None:
    """Write `out/ct/CASE.nii.gz` and `out/seg/CASE.nii.gz` atomically."""
    for folder, image in zip(("ct", "seg"), phantom_images(phantom), strict=True):
        write_atomically(Path(out) / folder / f"{phantom.case}.nii.gz", _nifti_gz_bytes(image))


LABEL_COLUMNS = ("case", "level", "grade", "fracture", "patient")


def label_rows(phantom: Phantom) -> list[dict[str, str | int]]:
    """labels.csv rows of a phantom: one per vertebra in its label map, head to feet."""
    return [
        {"case": phantom.case, "level": level, "grade": phantom.grades[level],
         "fracture": int(phantom.grades[level] >= 1), "patient": phantom.patient}
        for level in phantom.levels
    ]  # fmt: skip


def write_labels(path: Path, rows: Sequence[dict[str, str | int]]) -> Path:
    """Write labels.csv (columns LABEL_COLUMNS) atomically; returns its path."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(LABEL_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path = Path(path)
    write_atomically(path, buffer.getvalue().encode())
    return path


@dataclass(frozen=True, kw_only=True)
class PlannedCase:
    """Who a case is: its id, patient, and which anatomy/scan it draws."""

    case: str
    patient: str
    patient_index: int
    scan: int
    orientation: str
    ct_intercept: float
    clinical: bool = False


def plan_cases(cases: int, seed: int = 0, clinical: bool = False) -> list[PlannedCase]:
    """Case ids and patients: mostly one scan per patient, about one patient in six has two.

    Orientations cycle through ORIENTATIONS from a seed-drawn start so that any few
    consecutive cases differ; every fourth case stores CT as uint16 with intercept −1024.
    `clinical` marks every case clinical-size (`make_phantom(clinical=True)`).
    """
    if cases < 1:
        raise UsageError(f"--cases must be at least 1, got {cases}")
    rng = _rng(seed, 3_000_017)
    start = int(rng.integers(len(ORIENTATIONS)))
    plan: list[PlannedCase] = []
    patient = 0
    while len(plan) < cases:
        scans = 2 if (rng.random() < 0.2 and cases - len(plan) >= 2) else 1
        for scan in range(scans):
            index = len(plan)
            plan.append(
                PlannedCase(
                    case=f"case{index:03d}",
                    patient=f"P{patient:03d}",
                    patient_index=patient,
                    scan=scan,
                    orientation=ORIENTATIONS[(start + index) % len(ORIENTATIONS)],
                    ct_intercept=-1024.0 if index % 4 == 3 else 0.0,
                    clinical=clinical,
                )
            )
        patient += 1
    return plan


def build_planned(planned: PlannedCase, seed: int = 0, fracture_rate: float = 0.25) -> Phantom:
    """The phantom `write_phantoms` writes for one planned case."""
    phantom = make_phantom(
        (seed, planned.patient_index),
        scan=planned.scan,
        fracture_rate=fracture_rate,
        case=planned.case,
        patient=planned.patient,
        orientation=planned.orientation,
        clinical=planned.clinical,
    )
    if planned.ct_intercept:
        phantom = replace(phantom, ct_intercept=planned.ct_intercept)
    return phantom


def write_phantoms(config: SynthConfig, progress: Callable[[str], None] | None = None) -> Path:
    """Write `config.cases` phantoms under `config.out` (ct/, seg/, labels.csv); returns the
    labels.csv path. `progress`, if given, is called with each case id once it is written.

    Refuses an `out` whose ct/ or seg/ already holds cases this run would not write,
    so a smaller second run cannot leave stale cases beside a new labels.csv.
    """
    out, seed = config.out, config.seed
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: --out must be a folder, but a file of that name exists")
    plan = plan_cases(config.cases, seed, config.clinical)
    names = {f"{p.case}.nii.gz" for p in plan}
    for folder in ("ct", "seg"):
        directory = out / folder
        if directory.is_dir():
            stale = sorted(
                p.name
                for p in directory.iterdir()
                if p.name.endswith((".nii", ".nii.gz")) and p.name not in names
            )
            if stale:
                raise OutFolderInUseError(
                    f"{directory}: holds {len(stale)} case file(s) this run would not write "
                    f"(e.g. {stale[0]}); use an empty --out folder"
                )
    rows = []
    for planned in plan:
        phantom = build_planned(planned, seed, config.fracture_rate)
        write_phantom(phantom, out)
        rows.extend(label_rows(phantom))
        if progress is not None:
            progress(planned.case)
    labels = out / "labels.csv"
    write_labels(labels, rows)
    return labels


def write_random_shards(folder: Path, count: int, seed: int = 0) -> list[str]:
    """A labelled training shard of `count` random int16 crops (classes alternate): data for
    timing a training step or checking the plumbing, with nothing to learn."""
    from vctmae.ingest.writers import write_shards

    rng = np.random.default_rng(seed)
    samples = (
        (f"random{i:05d}_L1", rng.integers(-1200, 1500, size=(96, 96, 96), dtype=np.int16), i % 2)
        for i in range(count)
    )
    return [str(path) for path in write_shards(folder, "train", [samples])]
