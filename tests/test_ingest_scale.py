"""Ingest at clinical scale and its inputs: DICOM series, VerSe's layout, --segment, Dask.

- the crops sampled from the stored voxels equal the whole-volume chain's, bit for bit;
- label passes, stored-dtype reading, the gzip fallback;
- typed work records; assembly behind extraction (same bytes whatever is buffered; no crop
  decoded again when the worker handed it over);
- DICOM series folders as CTs, VerSe's rawdata/derivatives layout, --segment;
- the Dask executor on a real LocalCluster (2 worker processes, 1 thread each).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import (
    error_lines,
    ingest_cli,
    link_case,
    load_ct,
    reorient,
    tree_bytes,
    use_totalsegmentator,
)
from scipy import ndimage
from whole_volume_chain import crop_differences, whole_volume_crops

import vctmae.cli.ingest  # noqa: F401  (registers the commands)
from vctmae.ingest import assemble, label_pass, nifti, pipeline
from vctmae.ingest.discover import discover_cases
from vctmae.ingest.errors import IngestError
from vctmae.ingest.geometry import (
    GeometryConfig,
    Skipped,
    extract_crops,
    label_boxes,
    label_census,
    memory_order,
)
from vctmae.ingest.nifti import Volume, read_nifti_ct, read_nifti_labels
from vctmae.ingest.pipeline import IngestConfig, run_ingest
from vctmae.ingest.records import CaseRecord, CropRecord
from vctmae.synth import SynthConfig
from vctmae.synth.phantoms import write_phantoms

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    # Four cases: four storage orders, case003 stored uint16 with scl_inter −1024.
    src = tmp_path_factory.mktemp("phantoms")
    write_phantoms(SynthConfig(out=src, cases=4, seed=7, fracture_rate=0.4))
    return src


def pair(src: Path, case: str) -> tuple[Path, Path]:
    return src / "ct" / f"{case}.nii.gz", src / "seg" / f"{case}.nii.gz"


# --- no whole-volume passes, the same crops ------------------------------------------


def test_crops_equal_the_whole_volume_chain_bit_for_bit(phantoms, real_ct_dir, tmp_path):
    inputs = [pair(phantoms, f"case{i:03d}") for i in range(4)]
    real = (real_ct_dir / "ct.nii.gz", real_ct_dir / "seg.nii.gz")
    # The real CT once more, stored float32 and once as int16 with slope 2, intercept −1024.
    image = nib.load(real[0])
    hu = np.asanyarray(image.dataobj).astype(np.float64)
    as_float = tmp_path / "float.nii.gz"
    nib.save(nib.Nifti1Image(hu.astype(np.float32), image.affine), as_float)
    scaled = nib.Nifti1Image(np.floor((hu + 1024) / 2).astype(np.int16), image.affine)
    scaled.header.set_slope_inter(2.0, -1024.0)
    as_scaled = tmp_path / "scaled.nii.gz"
    nib.save(scaled, as_scaled)
    inputs += [real, (as_float, real[1]), (as_scaled, real[1])]
    seen = 0
    for config in (GeometryConfig(), GeometryConfig(keep_truncated=True, spacing=0.8, size=48)):
        for ct, seg in inputs:
            old, new = whole_volume_crops(ct, seg, config), extract_crops(ct, seg, config)
            assert [c.level for c in new.crops] == [c.level for c in old.crops]
            assert (new.skipped, new.scheme, new.other_labels) == (
                old.skipped,
                old.scheme,
                old.other_labels,
            )
            assert crop_differences(old, new) == {"max_abs_hu": 0.0, "label_facts_equal": True}
            seen += len(new.crops)
    assert seen >= 40


def test_stored_voxels_are_read_as_stored(phantoms, monkeypatch):
    ct_path, seg_path = pair(phantoms, "case003")  # uint16 with scl_inter −1024
    ct = read_nifti_ct(ct_path)
    stored = nib.load(ct_path)
    assert ct.data.dtype == np.uint16 and ct.data.flags.f_contiguous  # no float, no C copy
    assert (ct.slope, ct.intercept) == (1.0, -1024.0) and ct.scaled
    np.testing.assert_array_equal(ct.data, np.asanyarray(stored.dataobj.get_unscaled()))
    np.testing.assert_array_equal(load_ct(ct_path).data, stored.get_fdata(dtype=np.float32))
    labels = read_nifti_labels(seg_path)
    assert labels.data.dtype == np.uint8 and labels.data.flags.f_contiguous
    # The voxels are used where the decompression put them: a read-only view, no copy.
    assert not ct.data.flags.writeable and not ct.data.flags.owndata
    # Without python-isal the gzip module reads the same bytes.
    monkeypatch.setattr(nifti, "_fast_gzip", None)
    np.testing.assert_array_equal(read_nifti_ct(ct_path).data, ct.data)
    np.testing.assert_array_equal(read_nifti_labels(seg_path).data, labels.data)


def test_big_endian_and_truncated_gzip_files(phantoms, tmp_path):
    stored = nib.load(pair(phantoms, "case000")[0])
    voxels = np.asanyarray(stored.dataobj.get_unscaled())
    swapped = tmp_path / "big-endian.nii.gz"
    image = nib.Nifti1Image(voxels.astype(">i2"), stored.affine, stored.header.copy())
    image.header.set_data_dtype(">i2")
    nib.save(image, swapped)
    read = read_nifti_ct(swapped)
    np.testing.assert_array_equal(read.data, voxels)
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(swapped.read_bytes()[: swapped.stat().st_size // 2])
    with pytest.raises(IngestError, match="corrupt or truncated data"):
        read_nifti_ct(cut)


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.int32])
def test_label_census_and_boxes_equal_a_plain_pass(dtype, compiled, monkeypatch):
    # The compiled passes (1- and 2-byte maps) and the numpy passes (the rest, or no numba).
    monkeypatch.setattr(label_pass, "available", compiled)
    rng = np.random.default_rng(3)
    data = np.zeros((40, 30, 20), dtype=np.float64)
    data[5:9, 3:20, 2:7] = 20
    data[22:30, 10:12, 8:19] = 7
    data[rng.integers(0, 40, 30), rng.integers(0, 30, 30), rng.integers(0, 20, 30)] = 60
    if dtype in (np.int16, np.int32):
        data[0, 0, 0] = -5  # negative values are background
    stored = np.asfortranarray(data.astype(dtype))
    volume = Volume(path=Path("x"), data=stored, affine=np.eye(4))
    census = label_census(volume)
    values, counts = np.unique(np.clip(data, 0, None), return_counts=True)
    assert census.counts == {int(v): int(n) for v, n in zip(values, counts, strict=True) if v > 0}
    expected = ndimage.find_objects(np.clip(data, 0, None).astype(np.int32), max_label=50)
    assert label_boxes(volume) == expected
    assert census.boxes == expected
    # Index sums: the numerators of each vertebra value's centroid, exact integers.
    for value in range(1, 51):
        want = [int(idx.sum()) for idx in np.nonzero(data == value)]
        assert census.index_sums[value - 1].tolist() == want
    labelled = np.argwhere(data > 0)
    assert census.region == tuple(
        slice(int(lo), int(hi) + 1)
        for lo, hi in zip(labelled.min(axis=0), labelled.max(axis=0), strict=True)
    )
    view, order = memory_order(stored)
    assert order == (2, 1, 0) and view.flags.c_contiguous


# --- typed records ---------------------------------------------------------------------


def test_case_record_json_round_trip(tmp_path):
    crop = CropRecord(
        level="L1",
        label_value=20,
        centroid=(1.5, -2.25, 300.0),
        tangent=(0.0, 0.1, -0.994987),
        inside_fraction=0.875,
        bbox=(1, 2, 3, 4, 5, 6),
        truncated=False,
        shape=(96, 96, 96),
        sha256="ab" * 32,
        offset=0,
        nbytes=1234,
    )
    record = CaseRecord(
        case="case.1",
        patient="P1",
        ct="ct/case.1.nii.gz",
        seg="seg/case.1.nii.gz",
        series="1.2.3",
        geometry={"spacing": 1.0, "levels": ["L1"]},
        sources={"ct": [1, 2], "seg": [3, 4]},
        status="ok",
        source_orientation="LPS",
        source_spacing=(0.7, 0.7, 1.0),
        scheme="verse",
        other_labels=((60, 12),),
        crops=(crop,),
        skipped=(Skipped(level="T12", reason="truncated: mask touches the scan border"),),
        seconds=1.5,
    )
    path = tmp_path / "r.json"
    record.write(path)
    assert CaseRecord.read(path) == record
    assert json.loads(path.read_text())["crops"][0]["bbox"] == [1, 2, 3, 4, 5, 6]
    path.write_text("{not json")
    assert CaseRecord.read_if_valid(path) is None


# --- assembly behind extraction -------------------------------------------------------


@pytest.fixture(scope="module")
def reference_run(phantoms, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "out"
    config = IngestConfig(
        src=phantoms, out=out, labels=phantoms / "labels.csv", workers=2, progress=False
    )
    report = run_ingest(config)
    assert report["cases_ok"] == 4 and report["vertebrae_written"] > 10
    return out


def test_nothing_is_decoded_again_unless_read_back_and_bytes_never_change(
    phantoms, reference_run, tmp_path, monkeypatch
):
    decoded = []

    def counting_decode(data, shape):
        decoded.append(len(data))
        return real_decode(data, shape)

    real_decode = assemble.decode_crop
    monkeypatch.setattr(assemble, "decode_crop", counting_decode)
    out = tmp_path / "out"
    config = IngestConfig(
        src=phantoms, out=out, labels=phantoms / "labels.csv", workers=1, progress=False
    )
    run_ingest(config)
    assert decoded == []  # every crop came from the worker that cut it
    assert tree_bytes(out) == tree_bytes(reference_run)
    # Resumed cases' crops are read back (and checked) from the work files, to the same bytes.
    again = run_ingest(
        IngestConfig(
            src=phantoms, out=out, labels=phantoms / "labels.csv", force=False, progress=False
        )
    )
    assert again["assembly"] == "up to date" and decoded == []
    other = IngestConfig(
        src=phantoms,
        out=out,
        labels=phantoms / "labels.csv",
        formats={"wds"},
        workers=1,
        progress=False,
    )
    report = run_ingest(other)
    assert report["cases_resumed"] == 4 and len(decoded) == report["vertebrae_written"]


def test_cases_waiting_for_an_earlier_one_give_the_same_bytes(
    phantoms, reference_run, tmp_path, monkeypatch
):
    # No finished case may wait in memory: every one is read back from its work file.
    monkeypatch.setattr(pipeline, "BUFFERED_CASES", 0)
    out = tmp_path / "out"
    config = IngestConfig(
        src=phantoms, out=out, labels=phantoms / "labels.csv", workers=2, progress=False
    )
    report = run_ingest(config)
    assert report["assembly"] == "written" and report["cases_extracted"] == 4
    assert tree_bytes(out) == tree_bytes(reference_run)


# --- DICOM series folders as CTs ----------------------------------------------


@pytest.fixture(scope="module")
def dicom_phantom(tmp_path_factory):
    """A phantom as NIfTI (ct/ + seg/) and the same CT as a DICOM series folder (plus a second,
    smaller series in the same folder)."""
    from dicom_series import make_uid, write_series

    root = tmp_path_factory.mktemp("dicom-ingest")
    write_phantoms(SynthConfig(out=root / "nifti", cases=1, seed=5))
    ct_path, seg_path = pair(root / "nifti", "case000")
    volume = reorient(load_ct(ct_path), "LPS")
    folder = root / "dicom" / "ct" / "scan1"
    uid = make_uid("ingest-phantom")
    write_series(folder, volume, series=uid)
    small = Volume(path=ct_path, data=volume.data[:, :, :5], affine=volume.affine)
    write_series(folder, small, series=make_uid("scout"))
    (root / "dicom" / "seg").mkdir()
    (root / "dicom" / "seg" / "scan1.nii.gz").symlink_to(seg_path)
    return root, uid


def test_a_dicom_series_folder_gives_the_crops_of_its_nifti(dicom_phantom, tmp_path):
    root, uid = dicom_phantom
    cases, bad = discover_cases(root / "dicom")
    assert [c.case for c in cases] == ["scan1"] and not bad
    assert cases[0].ct.is_dir() and cases[0].ct_name == "ct/scan1"
    config = GeometryConfig()
    expected = extract_crops(*pair(root / "nifti", "case000"), config)
    got = extract_crops(cases[0].ct, cases[0].seg, config)  # the series with most slices
    assert got.source_orientation == "LPS" and [c.level for c in got.crops] == [
        c.level for c in expected.crops
    ]
    assert expected.crops
    for a, b in zip(got.crops, expected.crops, strict=True):
        np.testing.assert_allclose(a.centroid_world, b.centroid_world, atol=1e-3)
        # Integer HU both; a sampling point moved by float noise can flip one rounding.
        assert np.abs(a.array.astype(np.int32) - b.array).max() <= 1
    # End to end, and by pairs.csv: --series picks the series, a wrong one fails the case.
    report = run_ingest(IngestConfig(src=root / "dicom", out=tmp_path / "a", progress=False))
    assert report["cases_ok"] == 1 and report["vertebrae_written"] == len(expected.crops)
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"ct,seg,case,series\n{cases[0].ct},{cases[0].seg},chosen,{uid}\n")
    report = run_ingest(IngestConfig(pairs=pairs, out=tmp_path / "b", progress=False))
    assert report["cases_ok"] == 1 and report["vertebrae_written"] == len(expected.crops)
    report = run_ingest(
        IngestConfig(src=root / "dicom", out=tmp_path / "c", series="1.2.3.4", progress=False)
    )
    [failure] = report["failed"]
    assert "no series 1.2.3.4" in failure["reason"] and "ct/scan1" in failure["reason"]


# --- VerSe's official layout --------------------------------------------------


def test_verse_rawdata_and_derivatives_are_paired_without_a_pairs_file(real_ct_dir, tmp_path):
    ct, seg = real_ct_dir / "ct.nii.gz", real_ct_dir / "seg.nii.gz"
    data = tmp_path / "dataset-verse19training"
    places = {
        "sub-verse004": ("sub-verse004", "sub-verse004"),
        "sub-gl003_dir-ax": ("sub-gl003", "sub-gl003"),
        "sub-x_ses-2": ("sub-x/ses-2", "sub-x/ses-2"),
    }
    for case, (raw, derived) in places.items():
        (data / "rawdata" / raw).mkdir(parents=True)
        (data / "derivatives" / derived).mkdir(parents=True)
        (data / "rawdata" / raw / f"{case}_ct.nii.gz").symlink_to(ct)
        (data / "derivatives" / derived / f"{case}_seg-vert_msk.nii.gz").symlink_to(seg)
        # What else VerSe's derivatives hold: centroids and snapshots, not cases.
        (data / "derivatives" / derived / f"{case}_seg-subreg_ctd.json").write_text("[]")
    (data / "rawdata" / "sub-lost").mkdir()
    (data / "rawdata" / "sub-lost" / "sub-lost_ct.nii.gz").symlink_to(ct)
    cases, bad = discover_cases(tmp_path)
    assert [c.case for c in cases] == sorted(places)
    assert cases[1].seg_name == (
        "dataset-verse19training/derivatives/sub-verse004/sub-verse004_seg-vert_msk.nii.gz"
    )
    [lost] = bad
    assert lost.case == "sub-lost" and "derivatives/sub-lost/sub-lost_seg-vert_msk" in lost.problem
    report = run_ingest(IngestConfig(src=tmp_path, out=tmp_path / "out", progress=False))
    assert report["cases_ok"] == 3 and report["vertebrae_written"] == 3


# --- --segment ------------------------------------------------------------------


@pytest.fixture
def unlabelled(real_ct_dir, tmp_path) -> Path:
    src = tmp_path / "raw"
    link_case(src, "scan", real_ct_dir / "ct.nii.gz", None)
    return src


def test_segment_without_totalsegmentator_says_what_to_install(unlabelled, tmp_path, monkeypatch):
    use_totalsegmentator(monkeypatch, None)
    out = str(tmp_path / "out")
    result = ingest_cli("--src", str(unlabelled), "--out", out)
    assert result.exit_code == 1 and "no label map seg/scan.nii.gz" in result.output
    result = ingest_cli("--src", str(unlabelled), "--out", out, "--segment", "--workers", "1")
    assert result.exit_code == 1, result.output
    [line] = error_lines(result.output)
    assert "pip install 'vctmae[totalseg]'" in line and "TotalSegmentator" in line


def test_segment_without_weights_offline_says_to_set_totalseg_home_dir(
    unlabelled, tmp_path, monkeypatch
):
    # What the real package's weight download raises without a network: a ConnectionError.
    use_totalsegmentator(
        monkeypatch,
        "raise ConnectionError(\"HTTPSConnectionPool(host='github.com', port=443): Max retries\\n"
        " exceeded (Failed to resolve 'github.com')\")\n",
        tmp_path / "fake",
    )
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "weights"))
    out = tmp_path / "out"
    result = ingest_cli("--src", str(unlabelled), "--out", str(out), "--segment", "--workers", "1")
    assert result.exit_code == 1, result.output
    [line] = error_lines(result.output)
    assert "model weights" in line and "TOTALSEG_HOME_DIR" in line
    assert str(tmp_path / "weights") in line and "ConnectionError" in line
    assert not list(out.rglob("*.nii.gz"))  # no half-written label map


def test_segment_uses_the_label_map_totalsegmentator_writes(
    unlabelled, real_ct_dir, tmp_path, monkeypatch
):
    use_totalsegmentator(
        monkeypatch,
        f"""
        import shutil
        assert ml and task == "total" and "vertebrae_L1" in roi_subset, (ml, task, roi_subset)
        shutil.copyfile({str(real_ct_dir / "seg.nii.gz")!r}, output)
        """,
        tmp_path / "fake",
    )
    out = tmp_path / "out"
    report = run_ingest(IngestConfig(src=unlabelled, out=out, segment=True, progress=False))
    assert report["cases_ok"] == 1 and report["vertebrae_written"] == 1
    made = out / ".ingest-work" / "segmentations"
    [label_map] = list(made.glob("*.nii.gz"))
    assert label_map.read_bytes() == (real_ct_dir / "seg.nii.gz").read_bytes()
    # The same crop as with the label map given; a rerun resumes without segmenting again.
    given = tmp_path / "given"
    link_case(given, "scan", real_ct_dir / "ct.nii.gz", real_ct_dir / "seg.nii.gz")
    run_ingest(IngestConfig(src=given, out=tmp_path / "given-out", progress=False))
    with open(out / "manifest.csv") as a, open(tmp_path / "given-out" / "manifest.csv") as b:
        assert [r.split(",")[-1] for r in a] == [r.split(",")[-1] for r in b]  # sha256s
    again = run_ingest(IngestConfig(src=unlabelled, out=out, segment=True, progress=False))
    assert again["cases_resumed"] == 1 and again["assembly"] == "up to date"


# --- the Dask executor -------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_cases(real_ct_dir, tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("dask-cases")
    for name in ("a", "b", "c", "d"):
        link_case(src, name, real_ct_dir / "ct.nii.gz", real_ct_dir / "seg.nii.gz")
    return src


def test_dask_local_cluster_writes_the_process_pools_bytes_and_resumes(small_cases, tmp_path):
    pytest.importorskip("distributed")
    pool = run_ingest(
        IngestConfig(
            src=small_cases,
            out=tmp_path / "pool",
            workers=2,
            geometry=GeometryConfig(keep_truncated=True),
            progress=False,
        )
    )
    config = IngestConfig(
        src=small_cases,
        out=tmp_path / "dask",
        workers=2,
        executor="dask",
        geometry=GeometryConfig(keep_truncated=True),
        progress=False,
    )
    environment = dict(os.environ)
    report = run_ingest(config)
    # distributed sets OMP_NUM_THREADS=1 (and more) in this process while its cluster runs;
    # afterwards the environment is as it was (later subprocesses would run single-threaded).
    assert dict(os.environ) == environment
    assert report["executor"] == "dask" and report["workers"] == 2
    assert report["cases_ok"] == pool["cases_ok"] == 4
    assert report["vertebrae_written"] == pool["vertebrae_written"] == 16
    assert tree_bytes(tmp_path / "dask") == tree_bytes(tmp_path / "pool")
    again = run_ingest(config)
    assert (again["cases_resumed"], again["cases_extracted"], again["assembly"]) == (
        4,
        0,
        "up to date",
    )


def test_a_dask_worker_that_dies_fails_only_its_case(small_cases, real_ct_dir, tmp_path):
    pytest.importorskip("distributed")
    import dask

    src = tmp_path / "raw"
    for name in ("a", "boom", "c"):
        link_case(src, name, real_ct_dir / "ct.nii.gz", real_ct_dir / "seg.nii.gz")
    # Each worker process runs this at start: the "boom" case kills its worker, as the
    # kernel's OOM killer would.
    preload = tmp_path / "die_on_boom.py"
    preload.write_text(
        "import os, signal\n"
        "from vctmae.ingest import geometry\n"
        # Dask may run a preload more than once in a process: keep the real function once.
        "real = geometry.__dict__.setdefault('real_extract_crops', geometry.extract_crops)\n"
        "def extract_or_die(ct_path, seg_path, config, **options):\n"
        "    if 'boom' in str(ct_path):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(ct_path, seg_path, config, **options)\n"
        "geometry.extract_crops = extract_or_die\n"
    )
    settings = {
        "distributed.worker.preload": [str(preload)],
        # A case may kill one worker and be rerun once; a second death fails it.
        "distributed.scheduler.allowed-failures": 1,
    }
    with dask.config.set(settings):
        report = run_ingest(
            IngestConfig(src=src, out=tmp_path / "out", workers=2, executor="dask", progress=False)
        )
    assert [f["case"] for f in report["failed"]] == ["boom"]
    assert "worker process died" in report["failed"][0]["reason"]
    assert report["cases_ok"] == 2 and report["vertebrae_written"] == 2


def test_executor_flags_are_checked(small_cases, tmp_path):
    result = ingest_cli(
        "--src", str(small_cases), "--out", str(tmp_path / "o"), "--executor", "ray"
    )
    assert result.exit_code == 2 and "--executor must be one of process, dask" in result.output
    result = ingest_cli(
        "--src", str(small_cases), "--out", str(tmp_path / "o"), "--scheduler", "tcp://x:1"
    )
    assert result.exit_code == 2 and "add --executor dask" in result.output


def test_dask_executor_without_distributed_says_what_to_install(small_cases, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if the [dask] extra were missing
    result = ingest_cli(
        "--src", str(small_cases), "--out", str(tmp_path / "o"), "--executor", "dask"
    )
    assert result.exit_code == 1, result.output
    [line] = error_lines(result.output)
    assert line == "error: --executor dask needs dask.distributed: pip install 'vctmae[dask]'"
