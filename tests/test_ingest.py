"""End-to-end tests of `vctmae ingest`: outputs, labels/splits, determinism, resume, parts, bad input."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import ingest_cli, link_case, read_manifest, tree_bytes

import vctmae.cli.ingest  # noqa: F401  (registers the commands)
from vctmae.ingest.config import IngestConfig
from vctmae.ingest.pipeline import run_ingest
from vctmae.synth import SynthConfig
from vctmae.synth.phantoms import write_phantoms

PHANTOMS = 5
SHARD_SIZE = "8MB"  # a few crops per shard, so shards roll over


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("phantoms")
    write_phantoms(SynthConfig(out=src, cases=PHANTOMS, seed=3, fracture_rate=0.4))
    return src


def phantom_config(src: Path, out: Path, **overrides) -> IngestConfig:
    settings = dict(
        src=src,
        out=out,
        labels=src / "labels.csv",
        shard_size=SHARD_SIZE,
        workers=2,
        progress=False,
    )
    return IngestConfig(**{**settings, **overrides})


@pytest.fixture(scope="session")
def full_run(phantoms, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("full")
    report = run_ingest(phantom_config(phantoms, out))
    return out, report


# --- real CT ----------------------------------------------------------------------------------


def real_centroid(real_ct_dir: Path, label: int) -> np.ndarray:
    seg = nib.load(real_ct_dir / "seg.nii.gz")
    index = np.argwhere(np.asarray(seg.dataobj) == label).mean(axis=0)
    return seg.affine[:3, :3] @ index + seg.affine[:3, 3]


def test_real_ct_writes_only_l1_by_default(tmp_path, real_ct_dir):
    src = tmp_path / "raw"
    link_case(src, "abdomen.v1", real_ct_dir / "ct.nii.gz", real_ct_dir / "seg.nii.gz")
    report = run_ingest(IngestConfig(src=src, out=tmp_path / "out", workers=1, progress=False))
    assert (report["cases_ok"], report["cases_failed"], report["vertebrae_written"]) == (1, 0, 1)
    skipped = {s["level"]: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {"T11", "T12", "L2"}
    assert all(reason.startswith("truncated") for reason in skipped.values())
    [row] = read_manifest(tmp_path / "out")
    # Dots in the case id become "-" in the key; the case id itself is kept.
    assert (row["key"], row["case"], row["level"], row["split"], row["class"]) == (
        "abdomen-v1_L1",
        "abdomen.v1",
        "L1",
        "unlabeled",
        "",
    )
    centroid = np.array([float(row[f"centroid_{a}"]) for a in "xyz"])
    np.testing.assert_allclose(centroid, real_centroid(real_ct_dir, 31), atol=0.5)
    with tarfile.open(tmp_path / "out" / "unlabeled-000000.tar") as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile("abdomen-v1_L1.json").read())
    assert names == ["abdomen-v1_L1.crop.npy", "abdomen-v1_L1.json"]  # no .cls when unlabeled
    assert meta["source"] == {"ct": "ct/abdomen.v1.nii.gz", "seg": "seg/abdomen.v1.nii.gz"}
    assert meta["label_scheme"] == "totalseg" and meta["split"] == "unlabeled"
    # --force extracts and assembles again, to the same bytes.
    before = tree_bytes(tmp_path / "out")
    forced = run_ingest(
        IngestConfig(src=src, out=tmp_path / "out", workers=1, force=True, progress=False)
    )
    assert (forced["cases_extracted"], forced["cases_resumed"], forced["assembly"]) == (
        1,
        0,
        "written",
    )
    assert tree_bytes(tmp_path / "out") == before


def test_real_ct_keep_truncated_and_no_label(tmp_path, real_ct_dir):
    src = tmp_path / "raw"
    link_case(src, "real", real_ct_dir / "ct.nii.gz", real_ct_dir / "seg.nii.gz")
    labels = tmp_path / "labels.csv"
    labels.write_text("case,level,grade,split\nreal,L1,2,test\nreal,T12,0,test\n")
    result = ingest_cli(
        "--src",
        str(src),
        "--out",
        str(tmp_path / "out"),
        "--labels",
        str(labels),
        "--keep-truncated",
        "--workers",
        "1",
    )
    assert result.exit_code == 0, result.output
    rows = {r["level"]: r for r in read_manifest(tmp_path / "out")}
    assert set(rows) == {"T12", "L1"}
    assert (rows["L1"]["class"], rows["L1"]["grade"], rows["L1"]["truncated"]) == ("1", "2", "0")
    assert (rows["T12"]["class"], rows["T12"]["truncated"]) == ("0", "1")
    report = json.loads((tmp_path / "out" / "ingest-report.json").read_text())
    assert {s["level"] for s in report["skipped"]} == {"T11", "L2"}
    assert all(s["reason"].startswith("no label") for s in report["skipped"])
    for level, value in (("T12", 32), ("L1", 31)):
        centroid = np.array([float(rows[level][f"centroid_{a}"]) for a in "xyz"])
        np.testing.assert_allclose(centroid, real_centroid(real_ct_dir, value), atol=0.5)
    assert (tmp_path / "out" / "test-000000.tar").exists()


# --- phantoms: labels, splits, readers ----------------------------------------------------------


def test_labels_and_patient_level_splits(phantoms, full_run):
    out, report = full_run
    assert report["cases_failed"] == 0 and report["cases_ok"] == PHANTOMS
    with open(phantoms / "labels.csv", newline="") as f:
        truth = {(r["case"], r["level"]): r for r in csv.DictReader(f)}
    rows = read_manifest(out)
    assert len(rows) == report["vertebrae_written"] > 0
    split_of_patient: dict[str, set[str]] = {}
    for row in rows:
        label = truth[(row["case"], row["level"])]
        assert row["class"] == label["fracture"] and row["grade"] == label["grade"]
        assert row["patient"] == label["patient"]
        split_of_patient.setdefault(row["patient"], set()).add(row["split"])
    assert all(len(s) == 1 for s in split_of_patient.values()), split_of_patient
    # Each crop is centred on its vertebra: the manifest centroid is the label's world centroid,
    # whatever the phantom's storage orientation and spacing.
    for case in sorted({r["case"] for r in rows}):
        seg = nib.load(phantoms / "seg" / f"{case}.nii.gz")
        data = np.asarray(seg.dataobj)
        for row in (r for r in rows if r["case"] == case):
            index = np.argwhere(data == int(row["label_value"])).mean(axis=0)
            expected = seg.affine[:3, :3] @ index + seg.affine[:3, 3]
            got = np.array([float(row[f"centroid_{a}"]) for a in "xyz"])
            np.testing.assert_allclose(got, expected, atol=0.01)
    assert {r["split"] for r in rows} <= {"train", "val", "test"}
    assert {r["class"] for r in rows} == {"0", "1"}
    # Each shard holds one split and stays under the size limit unless it holds a single sample.
    for shard in sorted(out.glob("*.tar")):
        split = shard.name.rsplit("-", 1)[0]
        assert {r["split"] for r in rows if r["shard"] == shard.name} == {split}
        with tarfile.open(shard) as tar:
            samples = len(tar.getnames()) // 3
        assert shard.stat().st_size <= 8_000_000 or samples == 1
    assert len(list(out.glob("train-*.tar"))) >= 2


def test_stock_readers_and_checksums(full_run):
    import webdataset as wds
    import zarr

    out, _ = full_run
    rows = read_manifest(out)
    by_key = {r["key"]: r for r in rows}
    group = zarr.open_group(out / "crops.zarr", mode="r")
    keys = list(group.attrs["keys"])
    assert keys == [r["key"] for r in rows]
    assert group["crops"].shape == (len(rows), 96, 96, 96) and group["crops"].dtype == np.int16
    assert group["crops"].chunks == (1, 96, 96, 96)
    assert list(group["classes"][:]) == [int(r["class"]) for r in rows]
    assert list(group["grades"][:]) == [int(r["grade"]) for r in rows]
    assert list(group.attrs["splits"]) == [r["split"] for r in rows]

    seen = []
    shards = sorted(str(p) for p in out.glob("*.tar"))
    for sample in wds.WebDataset(shards, shardshuffle=False, empty_check=False).decode():
        key = sample["__key__"]
        row = by_key[key]
        crop = sample["crop.npy"]
        assert crop.dtype == np.int16 and crop.shape == (96, 96, 96) and crop.flags.c_contiguous
        assert hashlib.sha256(crop.tobytes()).hexdigest() == row["sha256"]
        np.testing.assert_array_equal(crop, group["crops"][int(row["zarr_index"])])
        assert sample["cls"] == int(row["class"])
        meta = sample["json"]
        assert (meta["key"], meta["level"], meta["split"], meta["class"]) == (
            key,
            row["level"],
            row["split"],
            int(row["class"]),
        )
        x0, x1, y0, y1, z0, z1 = meta["bbox"]
        assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96 and 0 <= z0 < z1 <= 96
        seen.append(key)
    assert sorted(seen) == sorted(by_key)

    listing = subprocess.run(["tar", "-tf", shards[0]], capture_output=True, text=True, check=True)
    members = listing.stdout.split()
    assert members and all(m.endswith((".crop.npy", ".json", ".cls")) for m in members)


# --- determinism, resume, parts -----------------------------------------------------------------


def test_rerun_is_up_to_date_and_worker_count_does_not_change_bytes(phantoms, full_run, tmp_path):
    out, _ = full_run
    before = tree_bytes(out)
    again = run_ingest(phantom_config(phantoms, out))
    assert again["cases_resumed"] == PHANTOMS and again["cases_extracted"] == 0
    assert tree_bytes(out) == before
    # A fresh run with one worker writes the same bytes as the run with two.
    single = tmp_path / "single"
    run_ingest(phantom_config(phantoms, single, workers=1))
    assert tree_bytes(single) == before


def test_killed_run_resumes_to_identical_output(phantoms, full_run, tmp_path):
    out = tmp_path / "killed"
    command = [
        sys.executable,
        "-m",
        "vctmae",
        "ingest",
        "--src",
        str(phantoms),
        "--out",
        str(out),
        "--labels",
        str(phantoms / "labels.csv"),
        "--shard-size",
        SHARD_SIZE,
        "--workers",
        "1",
        "--no-progress",
    ]
    process = subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    cases = out / ".ingest-work" / "cases"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if len(list(cases.glob("*.json"))) >= 1:
            break
        time.sleep(0.02)
    assert process.poll() is None, "run finished before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done = len(list(cases.glob("*.json")))
    assert 1 <= done < PHANTOMS
    # Nothing half-written.
    assert not list(out.glob("*.tar")) and not (out / "manifest.csv").exists()

    report = run_ingest(phantom_config(phantoms, out))
    assert report["cases_resumed"] == done and report["cases_extracted"] == PHANTOMS - done
    assert tree_bytes(out) == tree_bytes(full_run[0])


def test_parts_merge_to_the_full_run(phantoms, full_run, tmp_path):
    data = tmp_path / "data"
    reports = [
        run_ingest(phantom_config(phantoms, data / f"part-{i}", part=(i, 2))) for i in (1, 2)
    ]
    assert sum(r["cases_seen"] for r in reports) == PHANTOMS
    assert all(r["cases_ok"] >= 2 for r in reports)
    result = ingest_cli(
        "--merge",
        str(data / "part-1"),
        str(data / "part-2"),
        "--out",
        str(data),
        "--shard-size",
        SHARD_SIZE,
    )
    assert result.exit_code == 0, result.output
    assert tree_bytes(data) == tree_bytes(full_run[0])
    merged = json.loads((data / "ingest-report.json").read_text())
    assert merged["cases_ok"] == PHANTOMS and merged["geometry"] == full_run[1]["geometry"]
    assert merged["vertebrae_written"] == full_run[1]["vertebrae_written"]
    # A missing part is refused with a clear message.
    result = ingest_cli("--merge", str(data / "part-1"), "--out", str(tmp_path / "half"))
    assert result.exit_code != 0 and "missing part(s) 2/2" in result.output


# --- bad input ----------------------------------------------------------------------------------


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)


def test_bad_inputs_are_reported_and_good_cases_written(tmp_path, real_ct_dir):
    src = tmp_path / "raw"
    for name in ("good", "twin1", "twin2"):
        link_case(src, name, real_ct_dir / "ct.nii.gz", real_ct_dir / "seg.nii.gz")
    cube = np.zeros((24, 24, 24), np.int16)
    cube[8:16, 8:16, 8:16] = 20
    ct = np.full((24, 24, 24), 100, np.int16)
    (src / "ct" / "corrupt.nii.gz").write_bytes((real_ct_dir / "ct.nii.gz").read_bytes()[:5000])
    _nifti(src / "seg" / "corrupt.nii.gz", cube)
    (src / "ct" / "garbled.nii.gz").write_bytes(
        b"\x1f\x8b\x08\x00" + np.random.default_rng(0).bytes(4000)
    )
    _nifti(src / "seg" / "garbled.nii.gz", cube)
    (src / "ct" / "notes.txt").write_text("not an image\n")
    _nifti(src / "ct" / "fourd.nii.gz", np.zeros((24, 24, 24, 2), np.int16))
    _nifti(src / "seg" / "fourd.nii.gz", np.zeros((24, 24, 24, 2), np.int16))
    _nifti(src / "ct" / "shape.nii.gz", ct)
    _nifti(src / "seg" / "shape.nii.gz", np.zeros((24, 24, 20), np.int16))
    shifted = np.eye(4)
    shifted[:3, 3] = 30.0
    _nifti(src / "ct" / "affine.nii.gz", ct)
    _nifti(src / "seg" / "affine.nii.gz", cube, shifted)
    _nifti(src / "ct" / "empty.nii.gz", ct)
    _nifti(src / "seg" / "empty.nii.gz", np.zeros_like(cube))
    nan_ct = ct.astype(np.float32)
    nan_ct[3, 4, 5] = np.nan
    _nifti(src / "ct" / "nans.nii.gz", nan_ct)
    _nifti(src / "seg" / "nans.nii.gz", cube)
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "case,level,fracture,split,patient\n"
        "good,L1,1,train,A\ntwin1,L1,0,train,B\ntwin2,L1,0,test,B\n"
    )

    out = tmp_path / "out"
    result = ingest_cli(
        "--src", str(src), "--out", str(out), "--labels", str(labels), "--workers", "2"
    )
    assert result.exit_code == 1, result.output
    expected = {
        "corrupt": ("ct/corrupt.nii.gz", ""),
        "garbled": ("ct/garbled.nii.gz", ""),
        "notes.txt": ("ct/notes.txt", "not a NIfTI"),
        "fourd": ("fourd.nii.gz", "3-D"),
        "shape": ("shape.nii.gz", "shape"),
        "affine": ("affine.nii.gz", ""),
        "empty": ("seg/empty.nii.gz", ""),
        "nans": ("ct/nans.nii.gz", "NaN"),
        "twin1": (str(labels), "patient B is in two splits"),
        "twin2": (str(labels), "patient B is in two splits"),
    }
    report = json.loads((out / "ingest-report.json").read_text())
    failed = {f["case"]: f["reason"] for f in report["failed"]}
    assert set(failed) == set(expected)
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    for case, (file_part, problem) in expected.items():
        assert file_part in failed[case] and problem in failed[case], (case, failed[case])
        # One clear terminal line per bad case, naming the file and the problem.
        assert sum(failed[case] in line for line in lines) == 1, (case, lines)
    assert report["cases_ok"] == 1 and report["cases_failed"] == len(expected)
    [row] = read_manifest(out)
    assert (row["key"], row["class"], row["split"]) == ("good_L1", "1", "train")
