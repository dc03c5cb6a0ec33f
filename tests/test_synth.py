"""Synthetic spine phantoms (`vctmae synth`)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import read_rows
from typer.testing import CliRunner

from vctmae.ingest.levels import LEVELS, VERSE, VERSE_LABEL
from vctmae.synth import SynthConfig
from vctmae.synth.phantoms import build_planned, make_phantom, plan_cases, write_phantoms

CASES = 6


@pytest.fixture(scope="session")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "raw"
    labels = write_phantoms(SynthConfig(out=out, cases=CASES, seed=0, fracture_rate=0.5))
    assert labels == out / "labels.csv"
    return out


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_same_seed_writes_identical_bytes(written: Path, tmp_path: Path) -> None:
    again = tmp_path / "raw"
    write_phantoms(SynthConfig(out=again, cases=CASES, seed=0, fracture_rate=0.5))
    first, second = _files(written), _files(again)
    assert sorted(first) == sorted(second)
    assert len(first) == 2 * CASES + 1
    for name in first:
        assert first[name] == second[name], name


def test_different_seed_gives_different_cases(written: Path, tmp_path: Path) -> None:
    other = tmp_path / "raw"
    write_phantoms(SynthConfig(out=other, cases=2, seed=1, fracture_rate=0.5))
    for folder in ("ct", "seg"):
        assert (other / folder / "case000.nii.gz").read_bytes() != (
            written / folder / "case000.nii.gz"
        ).read_bytes()


def test_no_temporary_files_left(written: Path) -> None:
    names = [p.name for p in written.rglob("*")]
    assert not [n for n in names if n.startswith(".") or ".tmp" in n]
    assert sorted(p.name for p in (written / "ct").iterdir()) == [
        f"case{i:03d}.nii.gz" for i in range(CASES)
    ]


def test_labels_csv_matches_label_maps(written: Path) -> None:
    rows = read_rows(written / "labels.csv")
    with open(written / "labels.csv") as handle:
        assert handle.readline().strip() == "case,level,grade,fracture,patient"
    by_case: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        by_case[row["case"]].append(row)
    assert sorted(by_case) == [f"case{i:03d}" for i in range(CASES)]
    for case, case_rows in by_case.items():
        assert "." not in case
        ct = nib.load(written / "ct" / f"{case}.nii.gz")
        seg = nib.load(written / "seg" / f"{case}.nii.gz")
        assert ct.shape == seg.shape and len(ct.shape) == 3
        np.testing.assert_allclose(ct.affine, seg.affine)
        values = sorted(int(v) for v in np.unique(np.asanyarray(seg.dataobj)) if v != 0)
        # VerSe thoracic/lumbar values, consecutive (no gaps in the spine), at least 4 vertebrae.
        assert values == list(range(values[0], values[-1] + 1)) and len(values) >= 4
        assert all(8 <= v <= 24 for v in values)
        levels = [row["level"] for row in case_rows]
        assert levels == [VERSE[v] for v in values]  # one row per vertebra, head to feet
        assert levels == sorted(levels, key=LEVELS.index)
        grades = [int(row["grade"]) for row in case_rows]
        assert all(0 <= g <= 3 for g in grades)
        assert [int(row["fracture"]) for row in case_rows] == [int(g >= 1) for g in grades]
        assert grades[0] == 0 and grades[-1] == 0  # end vertebrae are never fractured
        assert len({row["patient"] for row in case_rows}) == 1
    assert any(int(row["grade"]) >= 1 for row in rows)
    assert any(int(row["grade"]) == 0 for row in rows)


def test_some_patients_have_two_scans_of_one_spine(written: Path) -> None:
    plan = plan_cases(24, seed=0)
    per_patient = defaultdict(list)
    for planned in plan:
        per_patient[planned.patient].append(planned.case)
    counts = sorted(len(cases) for cases in per_patient.values())
    assert counts[-1] == 2 and counts.count(1) > len(counts) / 2
    assert len({p.case for p in plan}) == 24

    rows = read_rows(written / "labels.csv")
    spines = defaultdict(dict)
    for row in rows:
        spines[row["patient"]].setdefault(row["case"], []).append((row["level"], row["grade"]))
    shared = [cases for cases in spines.values() if len(cases) == 2]
    assert shared, "seed 0 should give a two-scan patient among the first cases"
    for cases in shared:
        first, second = cases.values()
        # Same anatomy and fractures; the scans may cut an end vertebra differently.
        common = set(first) & set(second)
        assert len(common) >= min(len(first), len(second)) - 1


def test_spacing_and_orientation_vary_with_valid_affines(written: Path) -> None:
    codes, spacings = set(), set()
    for ct_path in sorted((written / "ct").iterdir()):
        image = nib.load(ct_path)
        affine = image.affine
        rotation = affine[:3, :3]
        zooms = np.sqrt((rotation**2).sum(axis=0))
        np.testing.assert_allclose(zooms, image.header.get_zooms()[:3], rtol=1e-5)
        assert np.all(zooms >= 0.7 - 1e-3) and np.all(zooms <= 1.5 + 1e-3)
        # Columns are orthogonal and each points along one world axis (axis permutation + flips).
        direction = rotation / zooms
        np.testing.assert_allclose(np.abs(direction).max(axis=0), 1.0, atol=1e-6)
        np.testing.assert_allclose(direction.T @ direction, np.eye(3), atol=1e-6)
        assert abs(np.linalg.det(rotation)) > 0.1
        np.testing.assert_allclose(image.get_qform(), image.get_sform(), atol=1e-4)
        assert int(image.header["sform_code"]) > 0 and int(image.header["qform_code"]) > 0
        assert image.header.get_xyzt_units()[0] == "mm"
        codes.add("".join(nib.aff2axcodes(affine)))
        spacings.add(tuple(np.round(zooms, 3)))
    assert len(codes) >= 4, codes
    assert len(spacings) == CASES
    assert any(max(s) / min(s) > 1.1 for s in spacings), "expected some anisotropic spacing"


def test_storage_orientation_does_not_change_anatomy() -> None:
    """The same scan stored as RAS, PIR and LPS is the same image once reoriented to canonical."""
    canonical = []
    for orientation in ("RAS", "PIR", "LPS"):
        phantom = make_phantom(7, orientation=orientation, spacing=(1.5, 1.25, 1.0))
        assert "".join(nib.aff2axcodes(phantom.affine)) == orientation == phantom.orientation
        ct = nib.as_closest_canonical(nib.Nifti1Image(phantom.ct, phantom.affine))
        seg = nib.as_closest_canonical(nib.Nifti1Image(phantom.seg, phantom.affine))
        canonical.append((np.asanyarray(ct.dataobj), np.asanyarray(seg.dataobj), ct.affine))
    reference = canonical[0]
    np.testing.assert_allclose(reference[2][:3, :3], np.diag([1.5, 1.25, 1.0]))
    for ct, seg, affine in canonical[1:]:
        np.testing.assert_array_equal(ct, reference[0])
        np.testing.assert_array_equal(seg, reference[1])
        np.testing.assert_allclose(affine, reference[2], atol=1e-6)


def test_files_hold_the_in_memory_phantom(written: Path) -> None:
    """Case 3 is stored as uint16 with scl_inter −1024; reading honours the scaling."""
    planned = plan_cases(CASES, seed=0)[3]
    phantom = build_planned(planned, seed=0, fracture_rate=0.5)
    ct = nib.load(written / "ct" / f"{planned.case}.nii.gz")
    seg = nib.load(written / "seg" / f"{planned.case}.nii.gz")
    assert ct.get_data_dtype() == np.uint16 and ct.dataobj.inter == -1024.0
    np.testing.assert_array_equal(np.asanyarray(ct.dataobj), phantom.ct)
    np.testing.assert_array_equal(np.asanyarray(seg.dataobj), phantom.seg)
    np.testing.assert_allclose(ct.affine, phantom.affine, atol=1e-5)
    plain = nib.load(written / "ct" / "case000.nii.gz")
    assert plain.get_data_dtype() == np.int16


def test_hu_ranges_are_plausible(written: Path) -> None:
    air_seen = False
    for case in range(CASES):
        ct = np.asanyarray(nib.load(written / "ct" / f"case{case:03d}.nii.gz").dataobj)
        seg = np.asanyarray(nib.load(written / "seg" / f"case{case:03d}.nii.gz").dataobj)
        bone = ct[seg > 0]
        assert 150 < np.median(bone) < 600  # trabecular core dominates the mask
        assert 550 < np.percentile(bone, 99) < 1000  # cortical shell ≈ +700
        rest = ct[seg == 0]
        assert -150 < np.median(rest) < 120  # mostly soft tissue, discs, fat
        assert ct.min() >= -1024 and ct.max() <= 1200
        air_seen |= np.mean(rest < -900) > 0.01
    assert air_seen, "some field of view should reach the air behind the back"


def _body_heights(seg: np.ndarray, affine: np.ndarray, label: int, above: np.ndarray,
                  below: np.ndarray) -> tuple[float, float]:  # fmt: skip
    """Anterior and middle body height (mm) of one vertebra, measured on its mask.

    The spine axis comes from the neighbours' centroids; chords along it are sampled
    (nearest voxel) at the midline, 2–4 mm and 12–14 mm behind the body's front.
    """
    index = np.argwhere(seg == label)
    points = index @ affine[:3, :3].T + affine[:3, 3]
    superior = above - below
    superior /= np.linalg.norm(superior)
    anterior = np.array([0.0, 1.0, 0.0]) - superior[1] * superior
    anterior /= np.linalg.norm(anterior)
    right = np.cross(anterior, superior)
    centre = points.mean(axis=0)
    centre = centre + np.median((points - centre) @ right) * right
    near_midline = np.abs((points - centre) @ right) < 2
    front = ((points - centre) @ anterior)[near_midline].max()
    inverse = np.linalg.inv(affine)
    steps = np.arange(-40, 40, 0.25)

    def chord(du: float, dv: float) -> float:
        line = centre + du * right + dv * anterior + steps[:, None] * superior
        voxels = np.rint(line @ inverse[:3, :3].T + inverse[:3, 3]).astype(int)
        inside = np.all((voxels >= 0) & (voxels < seg.shape), axis=1)
        return 0.25 * float(np.sum(seg[tuple(voxels[inside].T)] == label))

    def band(depths: tuple[int, ...]) -> float:
        return float(
            np.median([chord(du, front - d) for du in (-3, -1.5, 0, 1.5, 3) for d in depths])
        )

    return band((2, 3, 4)), band((12, 13, 14))


def _touches_border(mask: np.ndarray) -> bool:
    return any(mask.take(0, axis=a).any() or mask.take(-1, axis=a).any() for a in range(3))


def test_fractured_vertebrae_lose_anterior_or_middle_height() -> None:
    """Against its two intact neighbours, a fractured body is clearly lower in front or middle."""
    ratios: dict[int, list[float]] = defaultdict(list)
    for seed in range(8):
        phantom = make_phantom(1000 + seed, fracture_rate=0.3)
        levels = phantom.levels
        centroids = {}  # vertebrae wholly inside the scan
        for level in levels:
            mask = phantom.seg == VERSE_LABEL[level]
            if not _touches_border(mask):
                points = np.argwhere(mask) @ phantom.affine[:3, :3].T + phantom.affine[:3, 3]
                centroids[level] = points.mean(axis=0)
        heights = {}
        for i, level in enumerate(levels):
            if level not in centroids:
                continue
            above = levels[i - 1] if i > 0 and levels[i - 1] in centroids else level
            below = levels[i + 1] if i + 1 < len(levels) and levels[i + 1] in centroids else level
            if above != below:
                heights[level] = _body_heights(
                    phantom.seg,
                    phantom.affine,
                    VERSE_LABEL[level],
                    centroids[above],
                    centroids[below],
                )
        for above, level, below in zip(levels, levels[1:], levels[2:], strict=False):
            if {above, level, below} <= heights.keys() and phantom.grades[above] == phantom.grades[
                below
            ] == 0:
                ratio = min(
                    heights[level][k] / np.mean([heights[above][k], heights[below][k]])
                    for k in range(2)
                )
                ratios[phantom.grades[level]].append(ratio)
    fractured = [r for grade in (1, 2, 3) for r in ratios[grade]]
    assert len(ratios[0]) >= 5 and len(fractured) >= 3, dict(ratios)
    # Grade 1 loses ≥ 20 %; neighbours differ by a few % (level, natural variation, voxels).
    assert max(fractured) < 0.86, dict(ratios)
    assert min(ratios[0]) > 0.88, dict(ratios)
    by_grade = [np.mean(ratios[g]) for g in (1, 2, 3) if ratios[g]]
    assert by_grade == sorted(by_grade, reverse=True), dict(ratios)


def test_fracture_rate_extremes() -> None:
    none = make_phantom(3, fracture_rate=0.0, spacing=1.5)
    assert set(none.grades.values()) == {0}
    every = make_phantom(3, fracture_rate=1.0, spacing=1.5)
    inner = every.levels[1:-1]
    assert all(every.grades[level] >= 1 for level in inner)
    assert every.shapes[every.levels[0]] == "none"


def test_phantoms_refuse_bad_arguments() -> None:
    with pytest.raises(ValueError, match="fracture"):
        make_phantom(0, fracture_rate=1.5)
    with pytest.raises(ValueError, match="orientation"):
        make_phantom(0, orientation="LRS")
    with pytest.raises(ValueError):
        make_phantom(0, orientation="XYZ")
    with pytest.raises(ValueError, match="cases"):
        plan_cases(0)


def test_refuses_folder_with_other_cases(written: Path) -> None:
    before = _files(written)
    with pytest.raises(FileExistsError, match="case001"):
        write_phantoms(SynthConfig(out=written, cases=1, seed=0))
    assert _files(written) == before


def test_synth_checks_its_options_before_writing_then_writes_the_cases(tmp_path: Path) -> None:
    from vctmae.cli import app

    runner = CliRunner()
    bad = runner.invoke(app, ["synth", "--out", str(tmp_path / "a"), "--cases", "0"])
    assert bad.exit_code != 0 and "--cases" in bad.output
    bad = runner.invoke(app, ["synth", "--out", str(tmp_path / "a"), "--fracture-rate", "1.5"])
    assert bad.exit_code != 0 and "--fracture-rate" in bad.output
    assert not (tmp_path / "a").exists()

    result = runner.invoke(
        app, ["synth", "--out", str(tmp_path / "raw"), "--cases", "1", "--seed", "4"]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "raw" / "ct" / "case000.nii.gz").is_file()
    assert (tmp_path / "raw" / "seg" / "case000.nii.gz").is_file()
    assert read_rows(tmp_path / "raw" / "labels.csv")[0]["case"] == "case000"


# --- clinical-size phantoms ---------------------------------------------------------


def test_clinical_render_equals_the_whole_grid_render() -> None:
    """The clinical renderer (spine block + in-plane torso blur, slab-wise noise) draws what
    the whole-grid renderer draws on the same grid — here a coarse one, to stay fast."""
    from dataclasses import replace

    from vctmae.synth import phantoms as synth

    anatomy = synth._draw_anatomy(synth._rng(4), 0.5, clinical=True)
    scan = synth._draw_scan(synth._rng(4, 1), anatomy, None, None, clinical=True)
    step = (2.1, 2.1, 2.3)
    grid = tuple(
        int(np.floor((hi - lo) / s)) + 1 for lo, hi, s in zip(scan.lo, scan.hi, step, strict=True)
    )
    coarse = replace(scan, spacing=step, grid=grid)
    # The whole-grid path derives the same shape from the field of view.
    whole = replace(coarse, grid=None)
    ct_block, seg_block, affine_block = synth._render(anatomy, coarse, synth._rng(9))
    ct_whole, seg_whole, affine_whole = synth._render(anatomy, whole, synth._rng(9))
    assert ct_block.shape == ct_whole.shape == grid
    np.testing.assert_array_equal(affine_block, affine_whole)
    np.testing.assert_array_equal(seg_block, seg_whole)
    # Float rounding of the split blur may move a value across .5: one HU at most.
    assert np.abs(ct_block.astype(np.int32) - ct_whole).max() <= 1
    assert len(np.unique(seg_block)) - 1 >= 12


@pytest.mark.slow
def test_clinical_phantom_ingests_to_the_whole_volume_chains_crops(tmp_path: Path) -> None:
    """`vctmae synth --clinical`: a scanner-size case (512 × 512 × ~330 at ~0.7 × 0.7 × 1.1 mm,
    ≥ 12 vertebrae) that ingest cuts into the same crops as the whole-volume chain."""
    from whole_volume_chain import crop_differences, whole_volume_crops

    from vctmae.cli import app
    from vctmae.ingest.geometry import extract_crops

    result = CliRunner().invoke(
        app, ["synth", "--out", str(tmp_path / "raw"), "--cases", "1", "--clinical"]
    )
    assert result.exit_code == 0, result.output
    ct_path, seg_path = (tmp_path / "raw" / kind / "case000.nii.gz" for kind in ("ct", "seg"))
    image = nib.load(ct_path)
    shape, spacing = image.shape, np.sqrt((image.affine[:3, :3] ** 2).sum(axis=0))
    # Storage order varies; the in-plane axes are the two of 512 voxels.
    assert sorted(shape)[1:] == [512, 512] and 250 <= min(shape) <= 420
    in_plane = [float(spacing[i]) for i, n in enumerate(shape) if n == 512]
    slices = [float(spacing[i]) for i, n in enumerate(shape) if n != 512]
    assert len(in_plane) == 2 and all(0.6 <= s <= 0.8 for s in in_plane)
    assert len(slices) == 1 and 1.0 <= slices[0] <= 1.2
    levels = [row["level"] for row in read_rows(tmp_path / "raw" / "labels.csv")]
    assert len(levels) >= 12
    new = extract_crops(ct_path, seg_path)
    old = whole_volume_crops(ct_path, seg_path)
    assert len(new.crops) >= 10
    assert crop_differences(old, new) == {"max_abs_hu": 0.0, "label_facts_equal": True}
