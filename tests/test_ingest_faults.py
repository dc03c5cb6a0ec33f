"""Ingest under hostile input and faults: odd label maps, malicious case ids, kill -9,
a full disk, a kill at every step of publishing, and one clear line per expected failure."""

from __future__ import annotations

import builtins
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dicom_series import write_unreadable_dicom_folders
from helpers import error_lines, link_case, read_manifest, tree_bytes
from typer.testing import CliRunner

import vctmae.cli.ingest
import vctmae.cli.synth  # noqa: F401
from vctmae import files
from vctmae.cli.app import app
from vctmae.data.shards import ShardError, expand_shards
from vctmae.errors import UsageError
from vctmae.ingest import publish, writers
from vctmae.ingest.pipeline import IngestConfig, run_ingest
from vctmae.synth import SynthConfig
from vctmae.synth.phantoms import write_phantoms

REPO = Path(__file__).resolve().parents[1]
FLAT_MEMBER = re.compile(r"[A-Za-z0-9_-]+\.(crop\.npy|json|cls)")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("phantoms")
    write_phantoms(SynthConfig(out=src, cases=3, seed=5, fracture_rate=0.4))
    return src


def cli(*args: str):
    return CliRunner().invoke(app, [*args, "--no-progress"] if args[0] == "ingest" else list(args))


def with_stray_voxel(phantoms: Path, case: str, folder: Path, value: int = 35) -> Path:
    """A copy of `case`'s label map with one background voxel (well inside the scan) set to `value`."""
    seg = nib.load(phantoms / "seg" / f"{case}.nii.gz")
    data = np.asanyarray(seg.dataobj).copy()
    inner = np.argwhere(data[2:-2, 2:-2, 2:-2] == 0)[0] + 2
    data[tuple(inner)] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{case}-stray.nii.gz"
    nib.save(nib.Nifti1Image(data, seg.affine, seg.header), path)
    return path


# --- the label scheme is decided from the whole label set ------------------------------


def test_a_stray_voxel_does_not_switch_a_verse_map_and_is_reported(phantoms, tmp_path):
    src = tmp_path / "raw"
    stray = with_stray_voxel(phantoms, "case000", tmp_path / "edited")
    link_case(src, "clean", phantoms / "ct" / "case000.nii.gz", phantoms / "seg/case000.nii.gz")
    link_case(src, "stray", phantoms / "ct" / "case000.nii.gz", stray)
    out = tmp_path / "out"
    report = run_ingest(IngestConfig(src=src, out=out, workers=1, progress=False))
    assert report["cases_failed"] == 0 and report["cases_ok"] == 2
    rows = read_manifest(out)
    crops = {
        c: {r["level"]: r["sha256"] for r in rows if r["case"] == c} for c in ("clean", "stray")
    }
    # The stray voxel changes nothing: the same vertebrae, the same crop bytes.
    assert crops["stray"] == crops["clean"] and len(crops["clean"]) >= 5
    with tarfile.open(out / "unlabeled-000000.tar") as tar:
        meta = json.loads(tar.extractfile(f"stray_{next(iter(crops['stray']))}.json").read())
    assert meta["label_scheme"] == "verse"
    [listed] = report["label_values_not_vertebrae"]
    assert listed == {"case": "stray", "scheme": "verse", "labels": [{"value": 35, "voxels": 1}]}


def test_vertebrae_lost_to_a_wrong_scheme_fail_the_case(phantoms, tmp_path):
    src = tmp_path / "raw"
    link_case(
        src,
        "stray",
        phantoms / "ct" / "case000.nii.gz",
        with_stray_voxel(phantoms, "case000", tmp_path / "edited"),
    )
    out = tmp_path / "out"
    result = cli("ingest", "--src", str(src), "--out", str(out), "--label-scheme", "totalseg")
    assert result.exit_code == 1, result.output
    report = json.loads((out / "ingest-report.json").read_text())
    [failure] = report["failed"]
    assert failure["case"] == "stray" and "seg/stray.nii.gz" in failure["reason"]
    assert "no totalseg vertebra to crop" in failure["reason"]
    assert "(35 (T9): 1 voxel)" in failure["reason"] and "--label-scheme" in failure["reason"]
    assert report["vertebrae_written"] == 0


# --- a scan that cannot be read is named and counted, never dropped ---------------------------


def test_unreadable_dicom_folders_and_label_maps_without_a_ct_fail_by_name(phantoms, tmp_path):
    src = tmp_path / "raw"
    link_case(src, "good", phantoms / "ct" / "case000.nii.gz", phantoms / "seg/case000.nii.gz")
    expected = {
        case: (f"ct/{case}", words)
        for case, words in write_unreadable_dicom_folders(src, phantoms).items()
    }
    (src / "seg" / "orphan.nii.gz").symlink_to(phantoms / "seg" / "case001.nii.gz")
    expected["orphan"] = ("seg/orphan.nii.gz", "no CT ct/orphan.nii.gz or DICOM folder ct/orphan/")
    (src / "verse").mkdir()
    (src / "verse" / "sub-7_seg-vert_msk.nii.gz").symlink_to(phantoms / "seg/case002.nii.gz")
    expected["sub-7"] = ("verse/sub-7_seg-vert_msk.nii.gz", "no CT sub-7_ct.nii.gz")
    out = tmp_path / "out"
    result = cli("ingest", "--src", str(src), "--out", str(out), "--workers", "1")
    assert result.exit_code == 1, result.output
    report = json.loads((out / "ingest-report.json").read_text())
    failed = {f["case"]: f["reason"] for f in report["failed"]}
    assert set(failed) == set(expected), failed
    lines = error_lines(result.output)
    for case, (path, words) in expected.items():
        assert f"{path}: " in failed[case] and words in failed[case], (case, failed[case])
        assert sum(failed[case] in line for line in lines) == 1, (case, lines)
    assert report["cases_ok"] == 1 and report["cases_seen"] == 1 + len(expected)
    assert f"1/{1 + len(expected)} cases ok" in result.output


def test_a_label_set_both_schemes_read_fails_its_case_naming_the_choice(phantoms, tmp_path):
    # case000's VerSe T12 (19) and L1 (20) with a T13 (28) block: TotalSegmentator's L4 too.
    seg = nib.load(phantoms / "seg" / "case000.nii.gz")
    data = np.asanyarray(seg.dataobj).copy()
    assert not data[2:14, 2:14, 2:14].any() and {19, 20} <= set(np.unique(data).tolist())
    data[2:14, 2:14, 2:14] = 28
    edited = tmp_path / "edited" / "t13.nii.gz"
    edited.parent.mkdir()
    nib.save(nib.Nifti1Image(data, seg.affine, seg.header), edited)
    src = tmp_path / "raw"
    link_case(src, "clean", phantoms / "ct" / "case000.nii.gz", phantoms / "seg/case000.nii.gz")
    link_case(src, "t13", phantoms / "ct" / "case000.nii.gz", edited)
    out = tmp_path / "out"
    result = cli("ingest", "--src", str(src), "--out", str(out), "--workers", "1")
    assert result.exit_code == 1, result.output
    report = json.loads((out / "ingest-report.json").read_text())
    [failure] = report["failed"]
    assert (
        failure["case"] == "t13"
        and "seg/t13.nii.gz: label scheme is ambiguous" in failure["reason"]
    )
    assert "--label-scheme verse or --label-scheme totalseg" in failure["reason"]
    assert sum(failure["reason"] in line for line in error_lines(result.output)) == 1
    assert report["cases_ok"] == 1 and {r["case"] for r in read_manifest(out)} == {"clean"}


# --- crop keys are one flat name -------------------------------------------------------


def test_hostile_case_ids_give_flat_member_names(phantoms, tmp_path):
    ct, seg = phantoms / "ct" / "case001.nii.gz", phantoms / "seg" / "case001.nii.gz"
    ids = ["/tmp/x/evil", "../../up", "spaced out.v2"]
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("ct,seg,case\n" + "".join(f"{ct},{seg},{case}\n" for case in ids))
    out = tmp_path / "out"
    report = run_ingest(IngestConfig(pairs=pairs, out=out, workers=1, progress=False))
    assert report["cases_failed"] == 0 and report["cases_ok"] == 3
    names, metas = [], []
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                names.append(member.name)
                if member.name.endswith(".json"):
                    metas.append(json.loads(tar.extractfile(member).read()))
    assert names and all(FLAT_MEMBER.fullmatch(name) for name in names), names
    assert {m["case"] for m in metas} == set(ids)
    for meta in metas:
        assert meta["key"] == re.sub(r"[^A-Za-z0-9_-]", "-", meta["case"]) + "_" + meta["level"]
    assert {r["case"] for r in read_manifest(out)} == set(ids)
    # A plain extractall (no filter: the trusting default before Python 3.14) writes every
    # member straight into the target folder.
    target = tmp_path / "extracted"
    with tarfile.open(out / "unlabeled-000000.tar") as tar:
        tar.extractall(target, filter="fully_trusted")
    assert sorted(p.name for p in target.rglob("*")) == sorted(names)
    assert all(p.parent == target for p in target.rglob("*"))


def test_case_ids_that_clash_after_mapping_fail_the_later_case(phantoms, tmp_path):
    ct, seg = phantoms / "ct" / "case001.nii.gz", phantoms / "seg" / "case001.nii.gz"
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"ct,seg,case\n{ct},{seg},a/b c\n{ct},{seg},a-b-c\n")
    report = run_ingest(IngestConfig(pairs=pairs, out=tmp_path / "out", workers=1, progress=False))
    [failure] = report["failed"]
    assert failure["case"] == "a/b c" and "is already taken by another case" in failure["reason"]
    assert {r["case"] for r in read_manifest(tmp_path / "out")} == {"a-b-c"}


# --- workers die with the main process -------------------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has exited; only its parent has not reaped it


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_of_the_main_process_ends_its_workers(phantoms, tmp_path):
    src = tmp_path / "raw"
    for copy in range(3):
        for case in ("case000", "case001", "case002"):
            ct, seg = phantoms / "ct" / f"{case}.nii.gz", phantoms / "seg" / f"{case}.nii.gz"
            link_case(src, f"{case}-{copy}", ct, seg)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "vctmae", "ingest", "--src", str(src), "--out", str(out)]
    process = subprocess.Popen(
        [*command, "--workers", "2", "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    eof = threading.Event()

    def drain() -> None:
        process.stdout.read()
        eof.set()

    threading.Thread(target=drain, daemon=True).start()
    try:
        cases = out / ".ingest-work" / "cases"
        deadline = time.monotonic() + 120
        workers: list[int] = []
        while time.monotonic() < deadline and process.poll() is None:
            workers = _children(process.pid)
            if len(workers) >= 2 and list(cases.glob("*.json")):
                break
            time.sleep(0.02)
        assert process.poll() is None and len(workers) >= 2, "run ended before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        assert eof.wait(10), "the pipe never reached EOF: a worker still holds it"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
            time.sleep(0.05)
        assert not [pid for pid in workers if _alive(pid)]
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # whatever this test started and left
        except ProcessLookupError:
            pass


# --- one line per expected failure; tracebacks for bugs --------------------------------


_real_open = builtins.open


class FullDisk:
    """Stands in for `open`: files opened for writing under `folder` fail with ENOSPC once
    `free` bytes are used (what fits is written, as on a real disk)."""

    def __init__(self, folder: Path, free: int) -> None:
        self.folder, self.free = Path(folder).resolve(), free
        self.failed: list[str] = []

    def open(self, path, mode="r", *args, **kwargs):
        file = _real_open(path, mode, *args, **kwargs)
        if not set(mode) & set("wax") or self.folder not in Path(path).resolve().parents:
            return file
        return _FillingFile(file, self, str(path))


class _FillingFile:
    def __init__(self, file, disk: FullDisk, path: str) -> None:
        self._file, self._disk, self._path = file, disk, path

    def write(self, data):
        size = len(data.encode() if isinstance(data, str) else data)
        if size > self._disk.free:
            self._file.write(data[: self._disk.free])  # what fits lands on disk, as it would
            self._disk.free = 0
            self._disk.failed.append(self._path)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._disk.free -= size
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


def no_temporary_files(out: Path) -> bool:
    return not [p for p in out.rglob("*") if files.TEMPORARY in p.name]


@pytest.fixture(scope="module")
def two_cases_done(phantoms, tmp_path_factory) -> tuple[Path, Path]:
    """`src` with case000 and case001, and `out`: a finished ingest of them."""
    root = tmp_path_factory.mktemp("done")
    src = root / "raw"
    for case in ("case000", "case001"):
        link_case(
            src, case, phantoms / "ct" / f"{case}.nii.gz", phantoms / "seg" / f"{case}.nii.gz"
        )
    run_ingest(IngestConfig(src=src, out=root / "out", workers=1, progress=False))
    return src, root / "out"


def copy_done(two_cases_done, tmp_path) -> tuple[Path, Path]:
    src, out = two_cases_done
    shutil.copytree(src, tmp_path / "raw", symlinks=True)
    shutil.copytree(out, tmp_path / "out")
    return tmp_path / "raw", tmp_path / "out"


def test_disk_full_while_extracting_is_one_line_and_keeps_earlier_outputs(
    phantoms, two_cases_done, tmp_path, monkeypatch
):
    src, out = copy_done(two_cases_done, tmp_path)
    before = tree_bytes(out)
    finished = sorted((out / ".ingest-work" / "cases").glob("*.json"))
    link_case(src, "case002", phantoms / "ct/case002.nii.gz", phantoms / "seg/case002.nii.gz")
    disk = FullDisk(out, free=50_000)
    monkeypatch.setattr(builtins, "open", disk.open)
    result = cli("ingest", "--src", str(src), "--out", str(out), "--workers", "1")
    assert result.exit_code == 1, result.output
    [line] = error_lines(result.output)
    # The crops file was being written under its temporary name when the disk filled.
    failed = Path(disk.failed[0])
    crops_file = failed.with_name(failed.name.removeprefix(f"{files.TEMPORARY}{os.getpid()}-"))
    assert crops_file.suffix == ".crops" and failed == files.temporary_name(crops_file)
    assert (
        line == f"error: no space left on device writing {crops_file}; earlier outputs are intact"
    )
    assert tree_bytes(out) == before and no_temporary_files(out)
    assert sorted((out / ".ingest-work" / "cases").glob("*.json")) == finished
    monkeypatch.undo()
    again = run_ingest(IngestConfig(src=src, out=out, workers=1, progress=False))
    assert (again["cases_resumed"], again["cases_extracted"], again["cases_ok"]) == (2, 1, 3)


def test_disk_full_while_assembling_is_one_line_and_keeps_earlier_outputs(
    two_cases_done, tmp_path, monkeypatch
):
    src, out = copy_done(two_cases_done, tmp_path)
    before = tree_bytes(out)
    disk = FullDisk(out, free=2_000)  # the disk fills early in the first shard
    monkeypatch.setattr(builtins, "open", disk.open)
    args = ("ingest", "--src", str(src), "--out", str(out), "--shard-size", "2MB")
    result = cli(*args)
    assert result.exit_code == 1, result.output
    [line] = error_lines(result.output)
    assert line == (
        f"error: no space left on device writing {disk.failed[0]}; earlier outputs are intact"
    )
    assert "/.ingest-work/staging/" in disk.failed[0]
    assert tree_bytes(out) == before and no_temporary_files(out)
    assert not (out / ".ingest-work" / "staging").exists()  # its space is given back
    assert publish.interrupted_publish(out) is None
    monkeypatch.undo()
    assert cli(*args).exit_code == 0 and len(list(out.glob("*.tar"))) > 1


def test_disk_full_in_synth_is_one_line(tmp_path, monkeypatch):
    def fill(path, mode="r", *args, **kwargs):
        if "case001" in Path(path).name and "w" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return _real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fill)
    out = tmp_path / "raw"
    result = cli("synth", "--out", str(out), "--cases", "3")
    assert result.exit_code == 1, result.output
    [line] = error_lines(result.output)
    written = out / "ct" / "case001.nii.gz"
    assert line == f"error: no space left on device writing {written}; earlier outputs are intact"
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["case000.nii.gz"] * 2
    assert (
        nib.load(out / "ct" / "case000.nii.gz").shape == nib.load(out / "seg/case000.nii.gz").shape
    )


def test_out_naming_a_file_is_a_usage_error(tmp_path, phantoms):
    target = tmp_path / "data.txt"
    target.write_text("not a folder\n")
    for command in (("ingest", "--src", str(phantoms)), ("synth", "--cases", "1")):
        result = cli(*command, "--out", str(target))
        assert result.exit_code == 2, result.output
        [line] = error_lines(result.output)
        assert line == f"error: {target}: --out must be a folder, but a file of that name exists"
    result = cli("ingest", "--src", str(phantoms), "--out", str(target / "sub"))
    assert result.exit_code == 2 and error_lines(result.output)[0].startswith(f"error: {target}")
    assert target.read_text() == "not a folder\n"


def test_flag_errors_exit_2_and_bugs_keep_their_traceback(phantoms, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    for flags, words in (
        (("--format", "parquet"), "formats"),
        (("--levels", "X9"), "--levels: unknown vertebra level 'X9'"),
        (("--part", "3/2"), "--part"),
        (("--workers", "0"), "--workers"),
        (("--shard-size", "lots"), "cannot read size"),
        (("--align", "curvy"), "align"),
    ):
        result = cli("ingest", "--src", str(phantoms), "--out", out, *flags)
        assert result.exit_code == 2, (flags, result.output)
        [line] = error_lines(result.output)
        assert words in line, (flags, line)
    with pytest.raises(UsageError):
        IngestConfig(src=phantoms, out=tmp_path / "o", formats={"parquet"})
    assert not (tmp_path / "out").exists()

    from vctmae.ingest import pipeline

    def bug(config):
        raise RuntimeError("a bug somewhere")

    monkeypatch.setattr(pipeline, "run_ingest", bug)
    result = cli("ingest", "--src", str(phantoms), "--out", out)
    assert isinstance(result.exception, RuntimeError)  # not turned into one red line

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_ingest", interrupted)
    result = cli("ingest", "--src", str(phantoms), "--out", out)
    assert result.exit_code == 130
    assert "finished cases are kept; run the same command again to resume" in result.output


# --- header-only labels, --size below the frame rule -----------------------------------


def test_a_labels_file_with_only_a_header_is_an_error(phantoms, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("case,level,fracture\n")
    result = cli(
        "ingest", "--src", str(phantoms), "--out", str(tmp_path / "out"), "--labels", str(labels)
    )
    assert result.exit_code == 1, result.output
    assert error_lines(result.output) == [f"error: {labels}: holds only a header, no labels"]


def test_a_size_the_frame_rule_cannot_sample_is_refused_up_front(phantoms, tmp_path):
    from vctmae.data.frames import NUM_FRAMES, STRIDE
    from vctmae.ingest.config import MIN_TRAINING_SIZE

    assert MIN_TRAINING_SIZE == NUM_FRAMES * STRIDE  # the rule ingest checks is the loader's
    out = tmp_path / "out"
    result = cli("ingest", "--src", str(phantoms), "--out", str(out), "--size", "64")
    assert result.exit_code == 2, result.output
    [line] = error_lines(result.output)
    assert "--size 64" in line and "16 sagittal frames 6 slices apart" in line
    assert f"at least {NUM_FRAMES * STRIDE} voxels" in line
    assert not out.exists()


# --- publishing flips the whole set at one point ---------------------------------------


class Killed(BaseException):
    """Stands for kill -9: nothing in the product catches it."""


@pytest.fixture(scope="module")
def publish_sets(phantoms, two_cases_done, tmp_path_factory) -> dict:
    """A folder holding an old set (unlabelled, small shards), and the new set a run with
    labels and one shard per split would publish over it."""
    src, old = two_cases_done
    new = tmp_path_factory.mktemp("new") / "out"
    shutil.copytree(old, new)
    new_config = dict(
        src=src, labels=phantoms / "labels.csv", shard_size="1GiB", workers=1, progress=False
    )
    run_ingest(IngestConfig(out=new, **new_config))
    old_tree, new_tree = tree_bytes(old), tree_bytes(new)
    assert {p for p in old_tree if p.endswith(".tar")}.isdisjoint(
        p for p in new_tree if p.endswith(".tar")
    )
    assert old_tree["manifest.csv"] != new_tree["manifest.csv"]
    assert old_tree["crops.zarr/zarr.json"] != new_tree["crops.zarr/zarr.json"]
    return {"old": old, "old_tree": old_tree, "new_tree": new_tree, "config": new_config}


def test_a_kill_at_any_step_of_publishing_leaves_the_old_or_the_new_set(
    publish_sets, tmp_path, monkeypatch
):
    steps_seen: list[str] = []
    for stop in range(100):
        out = tmp_path / f"out-{stop}"
        shutil.copytree(publish_sets["old"], out)
        calls: list[str] = []

        def after_step(step: str, calls: list[str] = calls, stop: int = stop) -> None:
            calls.append(step)
            if len(calls) == stop + 1:
                raise Killed(step)

        monkeypatch.setattr(publish, "_after_step", after_step)
        config = IngestConfig(out=out, **publish_sets["config"])
        try:
            run_ingest(config)
        except Killed:
            pass
        else:
            break  # every step has been interrupted once
        steps_seen.append(calls[-1])
        monkeypatch.undo()
        # Killed after the commit point: the new set is the published one. While the journal
        # is there, the folder says so and the next run's first step completes the set.
        if calls[-1] != "journal removed":
            assert publish.interrupted_publish(out) is not None, calls[-1]
            assert publish.finish_publish(out)
        assert publish.interrupted_publish(out) is None
        assert tree_bytes(out) == publish_sets["new_tree"], calls[-1]
        report = run_ingest(config)
        assert report["assembly"] == "up to date" and publish.interrupted_publish(out) is None
        assert tree_bytes(out) == publish_sets["new_tree"]
    assert steps_seen[0] == "journal written" and steps_seen[-1] == "journal removed"
    assert "old crops.zarr moved aside" in steps_seen and len(steps_seen) >= 8


@pytest.mark.parametrize("where", ["writing the staged set", "writing the journal"])
def test_a_kill_before_the_commit_point_leaves_the_old_set(
    publish_sets, tmp_path, monkeypatch, where
):
    out = tmp_path / "out"
    shutil.copytree(publish_sets["old"], out)
    if where == "writing the journal":

        def killed_journal(path, data, *, durable=False):
            files.temporary_name(path).write_bytes(data[: len(data) // 2])
            raise Killed

        monkeypatch.setattr(publish, "write_atomically", killed_journal)
    else:
        writes = []

        def killed_write(self, key, members):
            writes.append(key)
            if len(writes) == 3:
                raise Killed

        monkeypatch.setattr(writers.ShardWriter, "write", killed_write)
    with pytest.raises(Killed):
        run_ingest(IngestConfig(out=out, **publish_sets["config"]))
    monkeypatch.undo()
    assert tree_bytes(out) == publish_sets["old_tree"]
    assert publish.interrupted_publish(out) is None and not publish.finish_publish(out)
    assert tree_bytes(out) == publish_sets["old_tree"]
    run_ingest(IngestConfig(out=out, **publish_sets["config"]))
    assert tree_bytes(out) == publish_sets["new_tree"]


def test_sigkill_between_the_renames_is_completed_by_the_next_run(publish_sets, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(publish_sets["old"], out)
    config = publish_sets["config"]
    script = (
        "import os, signal, sys\n"
        "from vctmae.ingest import publish\n"
        "def after_step(step):\n"
        "    if step == 'old crops.zarr moved aside':\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "publish._after_step = after_step\n"
        "from vctmae.cli import main\n"
        "sys.argv = ['vctmae', 'ingest', *sys.argv[1:]]\n"
        "main()\n"
    )
    flags = ["--src", str(config["src"]), "--labels", str(config["labels"]), "--out", str(out)]
    process = subprocess.run(
        [sys.executable, "-c", script, *flags, "--shard-size", "1GiB", "--workers", "1"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        timeout=300,
    )
    assert process.returncode == -signal.SIGKILL, process.stderr.decode()
    # The window of the issue: new shards, the old manifest, no crops.zarr — and a journal.
    assert not (out / "crops.zarr").exists() and publish.interrupted_publish(out) is not None
    # Training and eval refuse the half-published folder's shards, in one line.
    with pytest.raises(ShardError) as refused:
        expand_shards(str(out / "*.tar"))
    assert str(refused.value) == (
        f"{out}: an ingest was interrupted while publishing its outputs; run the same "
        "`vctmae ingest` again to finish it"
    )
    result = cli("ingest", *flags, "--shard-size", "1GiB", "--workers", "1")
    assert result.exit_code == 0, result.output
    # The run says, in one line, that it found a half-published set and completed it.
    [note] = [line for line in result.output.splitlines() if line.startswith("note:")]
    assert note == (
        f"note: {out}: an ingest was interrupted while publishing its outputs; "
        "completed them before this run"
    )
    assert tree_bytes(out) == publish_sets["new_tree"]
    report = json.loads((out / "ingest-report.json").read_text())
    assert report["assembly"] == "up to date"
    assert expand_shards(str(out / "*.tar")) == sorted(str(p) for p in out.glob("*.tar"))
