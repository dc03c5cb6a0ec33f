"""Unit tests of ingest's discovery, labels/splits, size parsing, shard writer and config checks."""

from __future__ import annotations

import csv
import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from vctmae.ingest.assemble import sample_key
from vctmae.ingest.config import IngestConfig, parse_part, parse_size
from vctmae.ingest.discover import discover_cases
from vctmae.ingest.labels import LabelsError, assign_cases, hashed_splits, read_labels
from vctmae.ingest.pipeline import run_ingest
from vctmae.ingest.writers import ShardWriter


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_discovery_finds_all_layouts_sorted_and_reports_problems(tmp_path):
    src = tmp_path / "src"
    touch(src / "site-b" / "ct" / "zeta.nii.gz")
    touch(src / "site-b" / "seg" / "zeta.nii.gz")
    touch(src / "site-a" / "ct" / "alpha.nii")
    touch(src / "site-a" / "seg" / "alpha.nii.gz")
    touch(src / "site-a" / "ct" / "lonely.nii.gz")  # no label map
    touch(src / "site-a" / "ct" / "readme.md")  # not NIfTI
    touch(src / "site-a" / "ct" / ".DS_Store")  # hidden: ignored
    touch(src / "verse" / "sub-01" / "sub-01_ct.nii.gz")
    touch(src / "verse" / "sub-01" / "sub-01_seg-vert_msk.nii.gz")
    touch(src / "verse" / "sub-02" / "sub-02_ct.nii.gz")  # VerSe CT without mask
    touch(src / "dup" / "ct" / "alpha.nii.gz")  # same case id twice
    touch(src / "dup" / "seg" / "alpha.nii.gz")
    out = src / "out"
    touch(out / "ct" / "old.nii.gz")  # the output folder is never searched
    touch(out / "seg" / "old.nii.gz")
    pairs = touch(tmp_path / "lists" / "pairs.csv")
    touch(tmp_path / "elsewhere" / "scan.nii.gz")
    touch(tmp_path / "elsewhere" / "mask.nii.gz")
    pairs.write_text(
        "ct,seg,case,patient\n../elsewhere/scan.nii.gz,../elsewhere/mask.nii.gz,beta,P7\n"
    )

    cases, bad = discover_cases(src, pairs=pairs, exclude=out)
    assert [c.case for c in cases] == ["alpha", "beta", "sub-01", "zeta"]
    by_id = {c.case: c for c in cases}
    assert by_id["alpha"].ct_name == "dup/ct/alpha.nii.gz"  # first in path order wins
    assert by_id["beta"].patient == "P7"
    assert by_id["beta"].ct.resolve() == (tmp_path / "elsewhere" / "scan.nii.gz").resolve()
    assert by_id["sub-01"].seg_name == "verse/sub-01/sub-01_seg-vert_msk.nii.gz"
    assert by_id["zeta"].patient == "zeta"
    problems = {b.path: b.problem for b in bad}
    assert "not a NIfTI" in problems["site-a/ct/readme.md"]
    assert "no label map" in problems["site-a/ct/lonely.nii.gz"]
    assert "no label map" in problems["verse/sub-02/sub-02_ct.nii.gz"]
    assert "duplicate case id" in problems["site-a/ct/alpha.nii"]
    assert len(bad) == 4


def write_labels(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_labels_grade_fracture_and_errors(tmp_path):
    labels = read_labels(
        write_labels(tmp_path / "a.csv", "case,level,grade\nc1,l1,0\nc1,T12,1\nc2,L2,3\n")
    )
    assert labels.vertebrae[("c1", "L1")].fracture == 0
    assert (
        labels.vertebrae[("c1", "T12")].fracture == 1 and labels.vertebrae[("c1", "T12")].grade == 1
    )
    only = read_labels(write_labels(tmp_path / "b.csv", "case,level,fracture\nc1,L1,1\n"))
    assert only.vertebrae[("c1", "L1")].grade is None
    for text, message in (
        ("case,level\nc1,L1\n", "needs columns"),
        ("case,level,grade\nc1,L1,5\n", "b.csv:2"),
        ("case,level,fracture\nc1,X9,1\n", "unknown vertebra level"),
        ("case,level,fracture,grade\nc1,L1,0,2\n", "contradicts"),
        ("case,level,fracture\nc1,L1,1\nc1,L1,0\n", "labelled twice"),
        ("case,level,fracture,split\nc1,L1,1,holdout\n", "split"),
    ):
        with pytest.raises(LabelsError, match=message):
            read_labels(write_labels(tmp_path / "b.csv", text))


def test_patient_in_two_splits_fails_only_its_cases(tmp_path):
    path = write_labels(
        tmp_path / "labels.csv",
        "case,level,fracture,split,patient\na,L1,0,train,P1\nb,L1,1,test,P1\nc,L1,0,val,P2\n",
    )
    assigned = assign_cases(read_labels(path), {"a": "a", "b": "b", "c": "c"})
    for case in ("a", "b"):
        assert "patient P1 is in two splits (test, train)" in assigned[case].error
        assert str(path) in assigned[case].error
    assert assigned["c"].error is None and (assigned["c"].patient, assigned["c"].split) == (
        "P2",
        "val",
    )


def test_hashed_split_is_60_20_20_deterministic_and_stable():
    patients = {f"patient-{i}" for i in range(100)}
    split = hashed_splits(patients)
    counts = {s: sum(v == s for v in split.values()) for s in ("train", "val", "test")}
    assert counts == {"train": 60, "val": 20, "test": 20}
    assert hashed_splits(set(sorted(patients, reverse=True))) == split
    grown = hashed_splits(patients | {f"new-{i}" for i in range(10)})
    moved = sum(grown[p] != split[p] for p in patients)
    assert moved <= 10  # only patients near the 60 % / 80 % boundaries move


def test_labels_without_split_keep_patients_together(tmp_path):
    rows = ["case,level,grade,patient"]
    for i in range(30):
        for scan in range(2):
            rows.append(f"p{i}s{scan},L1,{i % 4},P{i}")
    labels = read_labels(write_labels(tmp_path / "labels.csv", "\n".join(rows) + "\n"))
    cases = {f"p{i}s{s}": f"p{i}s{s}" for i in range(30) for s in range(2)}
    assigned = assign_cases(labels, cases)
    for i in range(30):
        assert assigned[f"p{i}s0"].split == assigned[f"p{i}s1"].split
        assert assigned[f"p{i}s0"].patient == f"P{i}"
    assert {a.split for a in assigned.values()} == {"train", "val", "test"}
    assert assign_cases(None, {"x": "x"})["x"].split == "unlabeled"


def test_parse_size_part_and_key():
    assert parse_size("1GiB") == 2**30
    assert parse_size("500MB") == 500_000_000
    assert parse_size("64k") == 65536
    assert parse_size("123") == 123
    with pytest.raises(ValueError):
        parse_size("lots")
    assert parse_part("2/8") == (2, 8)
    with pytest.raises(ValueError):
        parse_part("2-8")
    assert sample_key("sub-verse004.v2", "L1") == "sub-verse004-v2_L1"


def test_ingest_config_refuses_bad_values(tmp_path):
    with pytest.raises(ValueError, match="formats"):
        IngestConfig(src=tmp_path, out=tmp_path / "o", formats={"parquet"})
    with pytest.raises(ValueError, match="part"):
        IngestConfig(src=tmp_path, out=tmp_path / "o", part=(3, 2))
    with pytest.raises(ValueError, match="--src"):
        IngestConfig(out=tmp_path / "o")
    with pytest.raises(ValueError, match="merge"):
        IngestConfig(src=tmp_path, out=tmp_path / "o", merge=(tmp_path,))
    assert IngestConfig(src=tmp_path, out=tmp_path / "o", shard_size="2MiB").shard_size == 2 * 2**20


def test_shard_writer_rolls_over_and_is_deterministic(tmp_path):
    def write(folder: Path) -> list[str]:
        folder.mkdir()
        writer = ShardWriter(folder, "train", max_bytes=40_000)
        rng = np.random.default_rng(1)
        for i in range(10):
            writer.write(f"s{i}", [("bin", rng.bytes(9_000)), ("cls", b"1")])
        writer.write("huge", [("bin", b"x" * 100_000)])  # larger than a shard: a shard of its own
        writer.close()
        return writer.names

    names = write(tmp_path / "a")
    assert names == [f"train-{i:06d}.tar" for i in range(len(names))] and len(names) >= 4
    assert write(tmp_path / "b") == names
    for name in names:
        data_a, data_b = (tmp_path / "a" / name).read_bytes(), (tmp_path / "b" / name).read_bytes()
        assert hashlib.sha256(data_a).digest() == hashlib.sha256(data_b).digest()
        with tarfile.open(fileobj=io.BytesIO(data_a)) as tar:
            members = tar.getmembers()
        assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in members)
        assert len(data_a) <= 40_000 or [m.name for m in members] == ["huge.bin"]


def test_pairs_csv_and_wds_only_format(tmp_path, real_ct_dir):
    pairs = tmp_path / "pairs.csv"
    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / "a.nii.gz").symlink_to(real_ct_dir / "ct.nii.gz")
    (tmp_path / "scans" / "a-mask.nii.gz").symlink_to(real_ct_dir / "seg.nii.gz")
    pairs.write_text("ct,seg,case,patient\nscans/a.nii.gz,scans/a-mask.nii.gz,abdomen,P42\n")
    out = tmp_path / "out"
    report = run_ingest(IngestConfig(pairs=pairs, out=out, workers=1, progress=False))
    assert report["vertebrae_written"] == 1 and (out / "crops.zarr").exists()
    # Rerun as shards only: the now stale Zarr store is removed, manifest has no zarr index.
    report = run_ingest(
        IngestConfig(pairs=pairs, out=out, workers=1, formats={"wds"}, progress=False)
    )
    assert report["cases_resumed"] == 1 and report["assembly"] == "written"
    assert not (out / "crops.zarr").exists()
    with open(out / "manifest.csv", newline="") as f:
        [row] = list(csv.DictReader(f))
    assert (row["key"], row["patient"], row["zarr_index"], row["shard"]) == (
        "abdomen_L1",
        "P42",
        "",
        "unlabeled-000000.tar",
    )
    with tarfile.open(out / "unlabeled-000000.tar") as tar:
        meta = tar.extractfile("abdomen_L1.json").read().decode()
    assert '"ct": "scans/a.nii.gz"' in meta and '"patient": "P42"' in meta


def test_a_worker_that_dies_fails_only_its_case(tmp_path, monkeypatch, real_ct_dir):
    import os
    import signal

    from vctmae.ingest import geometry

    real_extract = geometry.extract_crops

    def extract_or_die(ct_path, seg_path, config, **options):
        if "boom" in str(ct_path):
            os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer would
        return real_extract(ct_path, seg_path, config, **options)

    # Workers are forked: they see the patched function.
    monkeypatch.setattr(geometry, "extract_crops", extract_or_die)
    src = tmp_path / "raw"
    for name in ("a", "boom", "c"):
        for kind in ("ct", "seg"):
            (src / kind).mkdir(parents=True, exist_ok=True)
            (src / kind / f"{name}.nii.gz").symlink_to(real_ct_dir / f"{kind}.nii.gz")
    report = run_ingest(IngestConfig(src=src, out=tmp_path / "out", workers=2, progress=False))
    assert [f["case"] for f in report["failed"]] == ["boom"]
    assert "worker process died" in report["failed"][0]["reason"]
    assert "ct/boom.nii.gz" in report["failed"][0]["reason"]
    assert report["cases_ok"] == 2 and report["vertebrae_written"] == 2


def test_case_ids_that_collide_as_keys_fail_the_second_case(tmp_path, real_ct_dir):
    src = tmp_path / "raw"
    for name in ("scan.1", "scan-1"):
        for kind in ("ct", "seg"):
            (src / kind).mkdir(parents=True, exist_ok=True)
            (src / kind / f"{name}.nii.gz").symlink_to(real_ct_dir / f"{kind}.nii.gz")
    report = run_ingest(IngestConfig(src=src, out=tmp_path / "out", workers=1, progress=False))
    assert report["vertebrae_written"] == 1
    [failure] = report["failed"]
    assert failure["case"] == "scan.1" and "scan-1_L1 is already taken" in failure["reason"]


def test_a_second_ingest_into_the_same_out_is_refused(tmp_path, real_ct_dir):
    import os

    from vctmae.ingest.pipeline import output_lock
    from vctmae.outlock import OutputLockedError

    src = tmp_path / "raw"
    for kind in ("ct", "seg"):
        (src / kind).mkdir(parents=True)
        (src / kind / "a.nii.gz").symlink_to(real_ct_dir / f"{kind}.nii.gz")
    with output_lock(tmp_path / "out"):  # as a run in another process would hold it
        held = rf"`vctmae ingest` \(pid {os.getpid()}\) is writing here"
        with pytest.raises(OutputLockedError, match=held):
            run_ingest(IngestConfig(src=src, out=tmp_path / "out", workers=1, progress=False))
    assert (
        run_ingest(IngestConfig(src=src, out=tmp_path / "out", workers=1, progress=False))[
            "cases_ok"
        ]
        == 1
    )


def test_flags_build_the_config_python_builds_from_the_same_text(tmp_path, monkeypatch):
    """Every `vctmae ingest` option lands on its `IngestConfig` field, and text options
    (`--format`, `--part`, `--levels`, `--shard-size`) mean the same in Python."""
    from typer.testing import CliRunner

    from vctmae.cli import app
    from vctmae.ingest import pipeline
    from vctmae.ingest.config import GeometryConfig

    seen = []

    def run_ingest(config):
        seen.append(config)
        raise KeyboardInterrupt  # the config reached the run: stop there

    monkeypatch.setattr(pipeline, "run_ingest", run_ingest)
    flags = ["--src", str(tmp_path), "--out", str(tmp_path / "o"), "--format", "wds",
             "--part", "2/3", "--levels", "T12-L2", "--shard-size", "3MiB", "--size", "112",
             "--spacing", "0.8", "--align", "axis", "--label-scheme", "verse",
             "--keep-truncated", "--workers", "3", "--series", "1.2.3", "--segment", "--force",
             "--no-progress"]  # fmt: skip
    assert CliRunner().invoke(app, ["ingest", *flags]).exit_code == 130
    same = dict(
        src=tmp_path, out=tmp_path / "o", workers=3, series="1.2.3", segment=True, force=True,
        progress=False,
    )  # fmt: skip
    geometry = dict(size=112, spacing=0.8, align="axis", label_scheme="verse", keep_truncated=True)
    text = IngestConfig(
        **same,
        formats="wds",
        part="2/3",
        shard_size="3MiB",
        geometry=GeometryConfig(**geometry, levels="T12-L2"),
    )
    parsed = IngestConfig(
        **same,
        formats={"wds"},
        part=(2, 3),
        shard_size=3 * 2**20,
        geometry=GeometryConfig(**geometry, levels=frozenset({"T12", "T13", "L1", "L2"})),
    )
    assert seen == [text] == [parsed]
    # Defaults: what a config built in Python without them holds.
    seen.clear()
    CliRunner().invoke(app, ["ingest", "--src", str(tmp_path), "--out", str(tmp_path / "o")])
    assert seen == [IngestConfig(src=tmp_path, out=tmp_path / "o")]
    assert seen[0].formats == {"wds", "zarr"} and seen[0].shard_size == 2**30
