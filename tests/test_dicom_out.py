"""`vctmae predict` on DICOM input: the findings as DICOM SEG and SR in the source study.

Phantoms are written as DICOM series by `test_dicom.write_series` (one LPS series, one
oblique series whose label map is stored along other axes, one without a frame of
reference); the model is a small random classifier. Both objects are read back with
highdicom and pydicom and compared with what predict reported and with the label map
mapped onto each source slice by the DICOM pixel-position formula; `dciodvfy`
(dicom3tools) validates them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from dicom_series import FLIP_XY, small_volume, write_series
from helpers import (
    cli,
    load_ct,
    load_labels,
    reorient,
    use_totalsegmentator,
)

from vctmae.ingest.dicom import load_dicom_ct
from vctmae.ingest.levels import SCHEMES
from vctmae.ingest.nifti import Volume
from vctmae.predict.config import PredictConfig
from vctmae.predict.dicom_out import (
    NIFTI_NOTE,
    SEG_FILE,
    SR_FILE,
    segment_numbers,
    write_dicom_objects,
)
from vctmae.predict.run import run_predict

PROBABILITY = ("fx-prob", "99VCTMAE")
THRESHOLD = ("fx-threshold", "99VCTMAE")
SUSPECTED = ("fx-suspected", "99VCTMAE")


def rotation(z_degrees: float, x_degrees: float) -> np.ndarray:
    z, x = np.radians(z_degrees), np.radians(x_degrees)
    about_z = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    about_x = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    return about_x @ about_z


def rotated(affine: np.ndarray, shape: tuple[int, ...], turn: np.ndarray) -> np.ndarray:
    """`affine` turned by `turn` about the volume's centre (the phantom stays in view)."""
    centre = affine[:3, :3] @ ((np.array(shape) - 1) / 2) + affine[:3, 3]
    world = np.eye(4)
    world[:3, :3] = turn
    world[:3, 3] = centre - turn @ centre
    return world @ affine


def file_digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def label_on_slice(path: Path, labels: Volume) -> tuple[np.ndarray, np.ndarray]:
    """The label map's value at each pixel of one source slice (0 outside the map), found by
    the DICOM pixel-position formula, and each pixel's distance from a rounding tie."""
    header = pydicom.dcmread(path, stop_before_pixels=True)
    row_direction = np.array(header.ImageOrientationPatient[:3], dtype=float)
    column_direction = np.array(header.ImageOrientationPatient[3:], dtype=float)
    position = np.array(header.ImagePositionPatient, dtype=float)
    row_spacing, column_spacing = (float(v) for v in header.PixelSpacing)
    rows, columns = np.meshgrid(np.arange(header.Rows), np.arange(header.Columns), indexing="ij")
    lps = (
        position
        + (columns * column_spacing)[..., None] * row_direction
        + (rows * row_spacing)[..., None] * column_direction
    )
    ras = lps @ FLIP_XY[:3, :3].T
    to_voxels = np.linalg.inv(labels.affine)
    voxels = ras @ to_voxels[:3, :3].T + to_voxels[:3, 3]
    tie = np.abs(np.abs(voxels - np.floor(voxels)) - 0.5).min(axis=-1)
    index = np.rint(voxels).astype(int)
    inside = np.all((index >= 0) & (index < labels.data.shape), axis=-1)
    clipped = [np.clip(index[..., a], 0, labels.data.shape[a] - 1) for a in range(3)]
    values = np.where(inside, np.asarray(labels.data)[tuple(clipped)], 0)
    return values, tie


def level_values(scheme: str) -> dict[str, int]:
    return {name: value for value, name in SCHEMES[scheme].items()}


def code_of(concept) -> tuple[str, str]:
    return (concept.value, concept.scheme_designator)


def text_values(dataset) -> list[str]:
    """Every TextValue anywhere in an SR's content tree."""
    found = []
    for item in dataset.get("ContentSequence", []):
        if "TextValue" in item:
            found.append(str(item.TextValue))
        found.extend(text_values(item))
    return found


@pytest.fixture(scope="module")
def source(raw, tmp_path_factory) -> Path:
    """--src with DICOM series in ct/ and label maps in seg/:

    - lps: phantom 0 as a scanner writes it (LPS); its label map stays stored LAS;
    - oblique: phantom 1 turned 20° about z and 9° about x, its label map on the same turned
      grid but stored along the phantom's own axes;
    - noframe: phantom 0 again, without FrameOfReferenceUID (SEG cannot be made).
    """
    src = tmp_path_factory.mktemp("dicom-out-src")
    (src / "seg").mkdir()
    ct0, seg0 = raw / "ct" / "case000.nii.gz", raw / "seg" / "case000.nii.gz"
    write_series(src / "ct" / "lps", reorient(load_ct(ct0), "LPS"), series="1.2.3.1")
    shutil.copy(seg0, src / "seg" / "lps.nii.gz")

    ct1, seg1 = load_ct(raw / "ct" / "case001.nii.gz"), load_labels(raw / "seg" / "case001.nii.gz")
    assert ct1.orientation not in ("LPS", "LAS")
    turned = rotated(ct1.affine, ct1.data.shape, rotation(20.0, 9.0))
    oblique = Volume(path=ct1.path, data=ct1.data, affine=turned)
    write_series(src / "ct" / "oblique", reorient(oblique, "LPS"), series="1.2.3.2")
    nib.save(nib.Nifti1Image(seg1.data, turned), src / "seg" / "oblique.nii.gz")

    for path in write_series(
        src / "ct" / "noframe", reorient(load_ct(ct0), "LPS"), series="1.2.3.3"
    ):
        dataset = pydicom.dcmread(path)
        del dataset.FrameOfReferenceUID
        dataset.save_as(path, enforce_file_format=True)
    shutil.copy(seg0, src / "seg" / "noframe.nii.gz")
    return src


@pytest.fixture(scope="module")
def predicted(source, checkpoint, tmp_path_factory):
    before = {case: file_digests(source / "ct" / case) for case in ("lps", "oblique")}
    out = tmp_path_factory.mktemp("dicom-out-report")
    config = PredictConfig(
        checkpoint=checkpoint, out=out, src=source, device="cpu", progress=False, attention=False
    )
    result = run_predict(config)
    return result, before


def scan_of(result, case: str):
    return next(scan for scan in result.scans if scan.case == case)


@pytest.mark.parametrize("case", ["lps", "oblique"])
def test_seg_holds_the_assessed_vertebrae_on_the_source_grid(predicted, source, case):
    result, _ = predicted
    scan = scan_of(result, case)
    assert scan.ok and len(scan.vertebrae) >= 5
    seg = hd.seg.segread(result.out / case / SEG_FILE)
    files = sorted((source / "ct" / case).iterdir())
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    assert seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == headers[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == headers[0].FrameOfReferenceUID
    assert seg.SeriesInstanceUID != headers[0].SeriesInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == headers[0].SeriesInstanceUID
    assert seg.PatientID == headers[0].PatientID == "PHANTOM"
    # Missing in the source, so present but empty; never filled in.
    assert "PatientBirthDate" not in headers[0] and seg.PatientBirthDate == ""
    assert seg.SeriesDescription == "vctmae vertebral fractures"

    levels = [v.level for v in scan.vertebrae]
    segments = list(seg.SegmentSequence)
    assert [s.SegmentLabel for s in segments] == levels
    for segment in segments:
        assert code_of(segment.SegmentedPropertyTypeCodeSequence[0]) == ("51282000", "SCT")
        # The given label map, resampled by vctmae (not TotalSegmentator's: see below).
        algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert segment.SegmentAlgorithmType == "AUTOMATIC" and algorithm.AlgorithmName == "vctmae"
        assert f"{case}.nii.gz" in algorithm.AlgorithmParameters
    uids = [h.SOPInstanceUID for h in headers]
    masks = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=list(range(1, len(levels) + 1))
    )
    labels = load_labels(source / "seg" / f"{case}.nii.gz")
    values = level_values(scan.scheme)
    expected = np.stack([label_on_slice(p, labels)[0] for p in files])
    for number, level in enumerate(levels):
        want = expected == values[level]
        assert want.sum() > 100
        np.testing.assert_array_equal(masks[..., number].astype(bool), want, err_msg=level)
    # The map's other vertebrae (not assessed) are in no segment.
    assessed = np.isin(expected, [values[level] for level in levels])
    assert not masks.any(axis=-1)[~assessed].any()


@pytest.mark.parametrize("case", ["lps", "oblique"])
def test_sr_groups_equal_predictions_csv_and_reference_their_segments(predicted, source, case):
    result, _ = predicted
    with open(result.out / "predictions.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["case"] == case]
    summary = json.loads((result.out / "summary.json").read_text())
    seg = pydicom.dcmread(result.out / case / SEG_FILE)
    sr = hd.sr.srread(result.out / case / SR_FILE)
    source_header = pydicom.dcmread(next((source / "ct" / case).iterdir()))
    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    assert sr.StudyInstanceUID == source_header.StudyInstanceUID
    assert sr.SeriesInstanceUID not in (seg.SeriesInstanceUID, source_header.SeriesInstanceUID)
    evidence = {
        series.SeriesInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
    }
    assert evidence == {seg.SeriesInstanceUID, source_header.SeriesInstanceUID}

    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(rows) >= 5
    labels = {s.SegmentNumber: s.SegmentLabel for s in seg.SegmentSequence}
    for group, row in zip(groups, rows, strict=True):
        assert group.tracking_identifier == row["level"]
        (probability,) = group.get_measurements(name=hd.sr.CodedConcept(*PROBABILITY, "x"))
        assert probability.value == float(row["prob_fracture"])
        assert code_of(probability.unit) == ("1", "UCUM")
        (threshold,) = group.get_measurements(name=hd.sr.CodedConcept(*THRESHOLD, "x"))
        assert threshold.value == pytest.approx(float(row["threshold"]), abs=1e-6)
        (suspected,) = group.get_qualitative_evaluations(name=hd.sr.CodedConcept(*SUSPECTED, "x"))
        answer = ("373066001", "SCT") if row["predicted"] == "1" else ("373067005", "SCT")
        assert code_of(suspected.value) == answer
        segment = group.referenced_segment
        assert segment.referenced_sop_instance_uid == seg.SOPInstanceUID
        (number,) = segment.referenced_segment_numbers
        assert labels[number] == row["level"]
        assert segment.source_series_for_segmentation.value == source_header.SeriesInstanceUID
    texts = text_values(sr)
    assert f"checkpoint sha256 {summary['run']['checkpoint_sha256']}" in texts
    assert "vctmae" in texts and summary["run"]["versions"]["vctmae"] in texts


def test_the_run_reports_both_files_and_leaves_the_source_unchanged(predicted, source):
    result, before = predicted
    summary = json.loads((result.out / "summary.json").read_text())
    for case in ("lps", "oblique"):
        (entry,) = [s for s in summary["scans"] if s["case"] == case]
        assert entry["dicom"] == [f"{case}/{SEG_FILE}", f"{case}/{SR_FILE}"]
        page = (result.out / case / "report.html").read_text()
        assert SEG_FILE in page and SR_FILE in page
        assert file_digests(source / "ct" / case) == before[case]
        assert not [p for p in (result.out / case).iterdir() if p.name.startswith(".tmp")]


def test_a_series_whose_objects_cannot_be_made_fails_alone(predicted):
    result, _ = predicted
    failed = scan_of(result, "noframe")
    assert [scan.case for scan in result.failed] == ["noframe"]
    assert "noframe" in failed.error and "DICOM SEG/SR" in failed.error
    assert "\n" not in failed.error and "Frame Of Reference" in failed.error
    assert not list((result.out / "noframe").glob("*.dcm"))


def test_an_sr_that_cannot_be_written_leaves_no_seg(
    predicted, source, checkpoint, monkeypatch, tmp_path
):
    import vctmae.predict.dicom_out as dicom_out
    from vctmae.infer.threshold import choose_threshold
    from vctmae.predict import report
    from vctmae.predict.run import Predictor, cut_scan, find_scans

    config = PredictConfig(
        checkpoint=checkpoint, out=tmp_path, src=source, device="cpu", progress=False
    )
    (case,) = [c for c in find_scans(config)[0] if c.case == "lps"]
    rule = Predictor(config).rule
    ct, labels, cut = cut_scan(case, config, case.seg, levels=None, segmented=False)
    run = report.RunFacts.of(
        config, choose_threshold(checkpoint, rule), rule, device="cpu", precision="fp32"
    )

    def refuse(*args, **kwargs):
        raise ValueError("no room in the SR")

    monkeypatch.setattr(dicom_out, "build_sr", refuse)
    scan = scan_of(predicted[0], "lps")
    volumes = (ct, labels, level_values(cut.scheme))
    failed = write_dicom_objects(scan, volumes, tmp_path, run, enabled=None)
    assert failed.status == "failed" and "no room in the SR" in failed.error
    assert not list((tmp_path / "lps").iterdir())


@pytest.mark.parametrize("case", ["lps", "oblique"])
def test_dciodvfy_finds_no_errors(predicted, case):
    """dicom3tools' validator on both objects: no error (its warnings are printed)."""
    if shutil.which("dciodvfy") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("dciodvfy (Debian package dicom3tools) is missing; .ci/run installs it")
        pytest.skip("dciodvfy not installed (apt-get install dicom3tools)")
    result, _ = predicted
    for name in (SEG_FILE, SR_FILE):
        check = subprocess.run(
            ["dciodvfy", str(result.out / case / name)], capture_output=True, text=True
        )
        lines = (check.stdout + check.stderr).splitlines()
        print(f"{case}/{name}:", *sorted(set(lines)), sep="\n  ")
        assert not [line for line in lines if line.startswith("Error")], lines
        assert any(line.strip() in ("Segmentation", "Comprehensive3DSR") for line in lines)


def test_labels_on_another_grid_are_resampled_nearest_neighbour(tmp_path):
    """A label map on a coarser axis-aligned grid, an oblique CT series: each SEG pixel takes
    the label of the map's voxel nearest to the pixel's DICOM position."""
    turn = rotation(25.0, 11.0)
    ct = small_volume((24, 20, 12), seed=5, spacing=(1.0, 1.2, 2.0))
    affine = np.eye(4)
    affine[:3, :3] = turn @ np.diag([1.0, 1.2, 2.0])
    affine[:3, 3] = (-10.0, 5.0, 40.0)
    paths = write_series(tmp_path / "ct", Volume(path=ct.path, data=ct.data, affine=affine))
    series = load_dicom_ct(tmp_path / "ct").dicom
    rng = np.random.default_rng(7)
    label_affine = np.diag([1.7, 1.9, 1.3, 1.0])
    label_affine[:3, 3] = (-25.0, -12.0, 25.0)
    labels = Volume(
        path=Path("labels"),
        data=rng.integers(0, 4, size=(30, 28, 40)).astype(np.uint8),
        affine=label_affine,
    )
    got = segment_numbers(series, labels, [3, 1])
    order = [paths.index(path) for path in series.files]
    assert order == list(range(len(paths)))  # write_series returns files in slice order
    expected, tie = zip(*(label_on_slice(path, labels) for path in paths), strict=True)
    expected, far_from_tie = np.stack(expected), np.stack(tie) > 1e-6
    want = np.select([expected == 3, expected == 1], [1, 2], 0)
    assert got.shape == want.shape and (want == 1).sum() > 50 and (want == 0).sum() > 50
    np.testing.assert_array_equal(got[far_from_tie], want[far_from_tie])


def test_nifti_input_writes_no_dicom_and_an_explicit_flag_says_so(raw, checkpoint, tmp_path):
    out = tmp_path / "report"
    result = cli(
        "predict", "--checkpoint", checkpoint, "--out", out, "--ct",
        raw / "ct" / "case000.nii.gz", "--seg", raw / "seg" / "case000.nii.gz",
        "--device", "cpu", "--no-progress", "--no-attention", "--dicom-out",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if "--dicom-out" in line]
    assert len(notes) == 1 and NIFTI_NOTE in notes[0] and "case000" in notes[0]
    assert not list(out.rglob("*.dcm"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scans"][0]["dicom"] == [] and summary["scans"][0]["dicom_note"] == NIFTI_NOTE


def test_no_dicom_out_writes_none_for_a_dicom_series(source, checkpoint, tmp_path):
    out = tmp_path / "report"
    result = cli(
        "predict", "--checkpoint", checkpoint, "--out", out, "--ct", source / "ct" / "lps",
        "--seg", source / "seg" / "lps.nii.gz", "--device", "cpu", "--no-progress",
        "--no-attention", "--no-dicom-out",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "--dicom-out" not in result.output
    assert (out / "lps" / "report.html").is_file() and not list(out.rglob("*.dcm"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scans"][0]["dicom"] == [] and summary["scans"][0]["dicom_note"] is None


def test_a_label_map_made_by_totalsegmentator_is_credited_to_it(
    real_ct_dir, checkpoint, tmp_path, monkeypatch
):
    """--segment on a DICOM series: the SEG's segments name TotalSegmentator as their algorithm."""
    use_totalsegmentator(
        monkeypatch,
        f"""
        import shutil
        shutil.copyfile({str(real_ct_dir / "seg.nii.gz")!r}, output)
        """,
        tmp_path / "fake",
    )
    series = tmp_path / "ct"
    write_series(series, reorient(load_ct(real_ct_dir / "ct.nii.gz"), "LPS"), series="1.2.3.9")
    config = PredictConfig(
        checkpoint=checkpoint, out=tmp_path / "out", ct=series, segment=True, device="cpu",
        progress=False, attention=False,
    )  # fmt: skip
    (scan,) = run_predict(config).scans
    assert scan.ok and scan.segmented and scan.vertebrae
    seg = pydicom.dcmread(tmp_path / "out" / "ct" / SEG_FILE)
    for segment in seg.SegmentSequence:
        algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "TotalSegmentator"
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
