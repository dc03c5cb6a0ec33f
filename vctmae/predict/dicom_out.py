"""A scan's findings as DICOM objects in the study of the DICOM series it was read from.

For a CT read from a DICOM series, `write_dicom_objects` writes beside the case's page:

    CASE/vertebrae.seg.dcm   DICOM Segmentation (BINARY) on the CT's own grid: one segment
                             per assessed vertebra, labelled with its level ("L1"), property
                             SCT Vertebra; a frame for each source slice a segment touches
    CASE/fractures.sr.dcm    Comprehensive 3D SR, TID 1500 Measurement Report: per assessed
                             vertebra a TID 1411 group tracked by its level, with the
                             probability of fracture, the decision threshold, whether a
                             fracture is suspected at it, the algorithm (vctmae, its version,
                             the checkpoint's sha256) and a reference to the vertebra's segment

Both join the source's study (its StudyInstanceUID, patient and study attributes copied
from the source headers, nothing invented), each in a series of its own. A NIfTI CT has
no study to join, so nothing is written for it.

Geometry: the label map is resampled nearest-neighbour onto the CT series' grid, whatever
grid it has itself. The SEG's frames are the source slices in position order, each frame
(rows, columns) as DICOM stores the slice: pixel (r, c) at
`ImagePositionPatient + c · Δcolumn · row direction + r · Δrow · column direction` (LPS);
`DicomSeries.affine` gives the same voxel (c, r, slice) in RAS+, so the label map's world
coordinates line up without a mirrored or transposed frame.

There are no standard codes for the probability of fracture or the suspicion, so they use
the private coding scheme 99VCTMAE (code values of at most 16 characters, which readers of
the SR's segment references require); yes/no are SNOMED CT's.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from vctmae.errors import OutOfSpaceError
from vctmae.files import write_atomically
from vctmae.ingest.nifti import Volume
from vctmae.ingest.series import DicomSeries
from vctmae.predict.results import ScanResult

SEG_FILE = "vertebrae.seg.dcm"
SR_FILE = "fractures.sr.dcm"
SERIES_DESCRIPTION = "vctmae vertebral fractures"
# Series numbers high enough to stay clear of the scanner's own series in the study.
SEG_SERIES_NUMBER = 9901
SR_SERIES_NUMBER = 9902
MANUFACTURER = "vctmae"
MODEL_NAME = "vctmae vertebral fracture classifier"
SCHEME = "99VCTMAE"
# Grids whose voxel centres coincide to this fraction of a voxel (any value under 0.5 gives
# nearest neighbour's result) are indexed, not resampled.
GRID_TOLERANCE = 0.1
# Patient and study attributes (type 2: present, perhaps empty) that highdicom copies from the
# source headers and refuses to do without; an anonymised export often lacks some.
PATIENT_AND_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
NIFTI_NOTE = "NIfTI input: no DICOM study to add a SEG and SR to"
NO_VERTEBRA_NOTE = "no vertebra assessed: no DICOM SEG or SR"


def _private_scheme():
    """The coding scheme identification of 99VCTMAE, declared in each object that uses it."""
    from highdicom.coding_schemes import CodingSchemeIdentificationItem

    return [
        CodingSchemeIdentificationItem(
            designator=SCHEME,
            name="vctmae private codes",
            responsible_organization="vctmae",
        )
    ]


def _codes():
    """The coded concepts of the SEG and SR (highdicom is imported on first use)."""
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    return {
        "probability": Code("fx-prob", SCHEME, "Probability of fracture"),
        "threshold": Code("fx-threshold", SCHEME, "Fracture decision threshold"),
        "suspected": Code("fx-suspected", SCHEME, "Fracture suspected"),
        "label_import": Code("label-import", SCHEME, "Label map import"),
        "ai": codes.cid7162.ArtificialIntelligence,
        "yes": codes.SCT.Yes,
        "no": codes.SCT.No,
        "unit": codes.UCUM.NoUnits,
        "vertebra": codes.SCT.Vertebra,
        "anatomy": codes.SCT.AnatomicalStructure,
    }


def segment_numbers(series: DicomSeries, labels: Volume, values: list[int]) -> np.ndarray:
    """Segment n (1-based) wherever the label map holds `values[n - 1]`, resampled
    nearest-neighbour onto the CT series' grid: (slices, rows, columns), 0 elsewhere."""
    from scipy.ndimage import affine_transform

    data = labels.data
    if data.dtype.kind == "f":
        data = np.rint(data)
    dtype = np.uint8 if len(values) < 2**8 else np.uint16
    numbered = np.zeros(data.shape, dtype=dtype)
    for number, value in enumerate(values, start=1):
        numbered[data == value] = number
    # CT voxel (column, row, slice) → world → label-map voxel.
    to_labels = np.linalg.inv(labels.affine) @ series.affine
    on_ct = _on_voxel_centres(numbered, to_labels, series.shape)
    if on_ct is None:
        on_ct = affine_transform(
            numbered,
            to_labels[:3, :3],
            offset=to_labels[:3, 3],
            output_shape=series.shape,
            order=0,
            mode="constant",
            cval=0,
        )
    return on_ct.transpose(2, 1, 0)


def _on_voxel_centres(
    numbered: np.ndarray, to_labels: np.ndarray, shape: tuple[int, int, int]
) -> np.ndarray | None:
    """`numbered` on the CT grid by indexing when each CT voxel centre lies on a label-map voxel
    centre (the grids differ by axis order, flips and a whole-voxel shift: predict's case);
    None otherwise. Voxels outside the label map are 0. The nearest-neighbour resampling's
    result exactly, ~6x faster on a clinical CT."""
    steps = np.rint(to_labels[:3, :3])
    offsets = np.rint(to_labels[:3, 3])
    if not (
        np.array_equal(np.abs(steps).sum(axis=0), [1, 1, 1])
        and np.array_equal(np.abs(steps).sum(axis=1), [1, 1, 1])
    ):
        return None
    # How far the exact label-map coordinates stray from the whole-voxel ones: largest at a
    # corner of the CT grid, the difference being affine. Under half a voxel, rounding the
    # exact ones (nearest neighbour) gives the whole-voxel ones.
    corners = np.array(np.meshgrid(*[(0, n - 1) for n in shape], indexing="ij")).reshape(3, -1)
    exact = to_labels[:3, :3] @ corners + to_labels[:3, 3:]
    whole = steps @ corners + offsets[:, None]
    if np.abs(exact - whole).max() > GRID_TOLERANCE:
        return None
    # Label axis a follows CT axis ct_axis[a], forwards or backwards.
    ct_axis = np.abs(steps).argmax(axis=1)
    indices, inside = [], []
    for axis in range(3):
        index = steps[axis, ct_axis[axis]] * np.arange(shape[ct_axis[axis]]) + offsets[axis]
        index = index.astype(np.int64)
        inside.append((index >= 0) & (index < numbered.shape[axis]))
        indices.append(np.clip(index, 0, numbered.shape[axis] - 1))
    taken = numbered[np.ix_(*indices)]
    for axis, valid in enumerate(inside):
        taken[(slice(None),) * axis + (~valid,)] = 0
    # Label-axis order → CT-axis order.
    return taken.transpose(np.argsort(ct_axis))


def source_headers(series: DicomSeries) -> list:
    """The source slices' headers in position order, with the patient and study attributes
    highdicom needs added empty where missing (in these copies only, never in the files)."""
    headers = series.headers()
    for header in headers:
        for keyword in PATIENT_AND_STUDY:
            if keyword not in header:
                setattr(header, keyword, "")
    return headers


def _algorithm(run) -> tuple[str, str, list[str]]:
    """vctmae's name, version and parameters (checkpoint digest, views) for the SR."""
    version = run.versions.get("vctmae", "unknown")
    parameters = [
        f"checkpoint sha256 {run.checkpoint_sha256}",
        f"checkpoint {Path(run.checkpoint).name}",
        f"views per vertebra {run.multiview}",
    ]
    return "vctmae", version, parameters


def build_seg(scan: ScanResult, ct: Volume, labels: Volume, label_values: dict[str, int], run):
    """The SEG dataset of the scan's assessed vertebrae (segment n = `scan.vertebrae[n - 1]`)."""
    import highdicom as hd

    code = _codes()
    series = ct.dicom
    headers = source_headers(series)
    levels = [vertebra.level for vertebra in scan.vertebrae]
    pixels = segment_numbers(series, labels, [label_values[level] for level in levels])
    _, version, _ = _algorithm(run)
    if scan.segmented:
        # The label map is TotalSegmentator's, made for this run.
        algorithm = hd.AlgorithmIdentificationSequence(
            name="TotalSegmentator",
            family=code["ai"],
            version=_totalsegmentator_version(),
        )
    else:
        # A label map given with the scan, resampled onto the CT's grid by vctmae.
        algorithm = hd.AlgorithmIdentificationSequence(
            name="vctmae",
            family=code["label_import"],
            version=version,
            parameters={"label map": Path(scan.seg).name, "resampling": "nearest neighbour"},
        )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=level,
            segmented_property_category=code["anatomy"],
            segmented_property_type=code["vertebra"],
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_id=level,
            tracking_uid=hd.UID(),
        )
        for number, level in enumerate(levels, start=1)
    ]
    return hd.seg.Segmentation(
        source_images=headers,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        # A software device: its name and version, never the machine's host name.
        device_serial_number=f"{MANUFACTURER}-{version}"[:64],
        content_label="VERTEBRAE",
        content_description="Assessed vertebrae, labelled by level",
        **_new_series(SEG_SERIES_NUMBER, version),
    ), headers


def _new_series(number: int, version: str) -> dict:
    """The arguments every object vctmae writes shares: a new series of one instance, by this
    software."""
    import highdicom as hd

    return dict(
        series_instance_uid=hd.UID(),
        series_number=number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=version,
        series_description=SERIES_DESCRIPTION,
        coding_schemes=_private_scheme(),
    )


def _totalsegmentator_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("TotalSegmentator")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_sr(scan: ScanResult, seg, headers: list, run):
    """The Comprehensive 3D SR (TID 1500) of the scan's findings, referencing `seg`'s segments."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    code = _codes()
    name, version, parameters = _algorithm(run)
    algorithm = hd.sr.AlgorithmIdentification(
        name=name, version=version, parameters=parameters, manufacturer=MANUFACTURER
    )
    threshold = run.threshold.value
    series_uid = headers[0].SeriesInstanceUID
    groups = []
    for number, (vertebra, segment) in enumerate(
        zip(scan.vertebrae, seg.SegmentSequence, strict=True), start=1
    ):
        # The value predictions.csv holds (8 decimals).
        probability = float(f"{vertebra.prob_fracture:.8f}")
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=segment.TrackingUID, identifier=vertebra.level
                ),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=seg.SOPClassUID,
                    sop_instance_uid=seg.SOPInstanceUID,
                    segment_number=number,
                    source_series=hd.sr.SourceSeriesForSegmentation(series_uid),
                ),
                finding_type=code["vertebra"],
                algorithm_id=algorithm,
                measurements=[
                    hd.sr.Measurement(
                        name=code["probability"],
                        value=probability,
                        unit=code["unit"],
                        algorithm_id=algorithm,
                    ),
                    hd.sr.Measurement(
                        name=code["threshold"], value=float(threshold), unit=code["unit"]
                    ),
                ],
                qualitative_evaluations=[
                    hd.sr.QualitativeEvaluation(
                        name=code["suspected"],
                        value=code["yes"] if vertebra.predicted else code["no"],
                    )
                ],
            )
        )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            # The same UID in every report: it names the software, not one run.
            uid=generate_uid(entropy_srcs=["vctmae device observer"]),
            name=name,
            manufacturer_name=MANUFACTURER,
            model_name=MODEL_NAME,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=groups,
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[*headers, seg],
        content=report[0],
        is_complete=True,
        **_new_series(SR_SERIES_NUMBER, version),
    )


def _save(dataset, path: Path) -> None:
    """Write a DICOM dataset atomically (a crash leaves the old file or none, never half)."""
    write_atomically(path, lambda handle: dataset.save_as(handle, enforce_file_format=True))


def write_dicom_objects(
    scan: ScanResult, volumes, out: Path, run, *, enabled: bool | None
) -> ScanResult:
    """Write a finished scan's SEG and SR under `out/CASE/` when its CT is a DICOM series.

    enabled: the run's `--dicom-out` (None: the default, on for DICOM input). Returns the
    scan with the files written (relative to `out`) or a note why none were; a scan whose
    objects cannot be made or written fails alone with one line. A full disk is raised.
    """
    if not scan.ok or volumes is None or enabled is False:
        return scan
    ct, labels, label_values = volumes
    if ct.dicom is None:
        return dataclasses.replace(scan, dicom_note=NIFTI_NOTE)
    if not scan.vertebrae:
        return dataclasses.replace(scan, dicom_note=NO_VERTEBRA_NOTE)
    started = time.perf_counter()
    folder = out / scan.folder
    written: list[Path] = []
    try:
        seg, headers = build_seg(scan, ct, labels, label_values, run)
        _save(seg, folder / SEG_FILE)
        written.append(folder / SEG_FILE)
        _save(build_sr(scan, seg, headers, run), folder / SR_FILE)
        written.append(folder / SR_FILE)
    except OutOfSpaceError:
        raise
    except Exception as error:
        for path in written:  # a SEG without its SR would be half the findings
            path.unlink(missing_ok=True)
        detail = " ".join(str(error).split()) or "no details"
        line = f"{scan.ct}: cannot write the DICOM SEG/SR ({type(error).__name__}: {detail})"
        return dataclasses.replace(scan, status="failed", error=line, vertebrae=())
    files = tuple(f"{scan.folder}/{path.name}" for path in written)
    seconds = {**scan.seconds, "dicom": time.perf_counter() - started}
    return dataclasses.replace(scan, dicom=files, seconds=seconds)


def not_written_line(scans, shown: int = 3) -> str | None:
    """One line naming the finished scans without a SEG and SR and why (None: there are none)."""
    skipped = [scan for scan in scans if scan.ok and scan.dicom_note]
    if not skipped:
        return None
    named = "; ".join(f"{scan.case} ({scan.dicom_note})" for scan in skipped[:shown])
    more = f"; and {len(skipped) - shown} more (summary.json)" if len(skipped) > shown else ""
    return f"no DICOM SEG/SR written for {len(skipped)} scan(s): {named}{more}"


__all__ = [
    "SEG_FILE",
    "SR_FILE",
    "write_dicom_objects",
    "not_written_line",
    "segment_numbers",
    "source_headers",
]
