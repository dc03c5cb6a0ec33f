"""`vctmae predict` over an archive: the pipeline across scans, `--resume`, the index.

A shrunken `tiny` classifier with random weights on a few phantoms: what is checked is that the
pipelined run reports exactly what the sequential one does, that a stopped run resumes to the
same bytes, and that the index lists every scan in order of probability.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    SMALL_MODEL,
    cli,
    error_lines,
    linked_source,
    predict_config,
    random_classifier,
)

from vctmae.errors import UsageError
from vctmae.model import build_classifier
from vctmae.model.checkpoint import save_model
from vctmae.predict.run import RECORD, run_predict
from vctmae.synth import SynthConfig
from vctmae.synth.phantoms import write_phantoms

CASES = ("case000", "case001", "case002")
# Quick settings: one view, no attention pictures; 5 crops per pass, so passes span scans.
QUICK = dict(attention=False, multiview=1, batch_size=5)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("archive-raw")
    write_phantoms(SynthConfig(out=root / "raw", cases=len(CASES), seed=1))
    return root / "raw"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return random_classifier(tmp_path_factory.mktemp("archive-model"))


@pytest.fixture(scope="module")
def sequential(raw, checkpoint, tmp_path_factory) -> Path:
    """One scan after another in this process (--workers 0)."""
    out = tmp_path_factory.mktemp("archive") / "sequential"
    run_predict(predict_config(checkpoint, out, src=raw, workers=0, **QUICK))
    return out


def scans_without_timings(out: Path) -> list[dict]:
    scans = json.loads((out / "summary.json").read_text())["scans"]
    return [{k: v for k, v in scan.items() if k != "timings_s"} for scan in scans]


def count_cuts(monkeypatch) -> list[str]:
    """The cases `cut_scan` is called for in this process (--workers 0)."""
    from vctmae.predict import run

    seen, cut = [], run.cut_scan

    def counted(case, *args, **kwargs):
        seen.append(case.case)
        return cut(case, *args, **kwargs)

    monkeypatch.setattr(run, "cut_scan", counted)
    return seen


def test_workers_report_exactly_what_the_sequential_run_does(raw, checkpoint, sequential, tmp_path):
    out = tmp_path / "pipelined"
    result = run_predict(predict_config(checkpoint, out, src=raw, workers=2, **QUICK))
    assert [scan.case for scan in result.scans] == list(CASES) and not result.failed
    assert (out / "predictions.csv").read_bytes() == (sequential / "predictions.csv").read_bytes()
    assert scans_without_timings(out) == scans_without_timings(sequential)
    for case in CASES:
        assert (out / case / RECORD).is_file() and (out / case / "report.html").is_file()


# A predict run in another process that blocks for good while writing its third scan's page,
# after dropping a marker: its first two scans are done, the third is in flight.
BLOCKED_RUN = """
import sys, time
from pathlib import Path
from vctmae.predict import report
from vctmae.predict.config import PredictConfig
from vctmae.predict.run import run_predict

checkpoint, src, out, marker = map(Path, sys.argv[1:])
write_scan, calls = report.write_scan, []

def blocking(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        marker.write_text("blocked")
        time.sleep(3600)
    return write_scan(*args, **kwargs)

report.write_scan = blocking
run_predict(PredictConfig(checkpoint=checkpoint, src=src, out=out, device="cpu", progress=False,
                          workers=1, attention=False, multiview=1, batch_size=5))
"""


def test_a_killed_run_resumes_to_the_bytes_of_an_uninterrupted_one(
    raw, checkpoint, sequential, tmp_path, monkeypatch
):
    out, marker = tmp_path / "killed", tmp_path / "marker"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen(
        [sys.executable, "-c", BLOCKED_RUN, str(checkpoint), str(raw), str(out), str(marker)],
        env=env,
    )
    try:
        deadline = time.monotonic() + 600
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), "the run never reached its third scan"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    done = sorted(path.parent.name for path in out.glob(f"*/{RECORD}"))
    assert done == list(CASES[:2])
    stamps = {case: (out / case / RECORD).stat().st_mtime_ns for case in done}

    # Without --resume the used folder is refused, as any earlier report.
    with pytest.raises(UsageError, match="--resume"):
        run_predict(predict_config(checkpoint, out, src=raw, workers=0, **QUICK))
    cut = count_cuts(monkeypatch)
    result = run_predict(predict_config(checkpoint, out, src=raw, workers=0, resume=True, **QUICK))
    assert cut == [CASES[2]] and not result.failed
    assert {case: (out / case / RECORD).stat().st_mtime_ns for case in done} == stamps
    assert (out / "predictions.csv").read_bytes() == (sequential / "predictions.csv").read_bytes()
    assert scans_without_timings(out) == scans_without_timings(sequential)


def test_resume_is_refused_naming_what_changed_and_allows_what_does_not_matter(
    raw, checkpoint, sequential, tmp_path, monkeypatch
):
    out = tmp_path / "report"
    shutil.copytree(sequential, out)
    with pytest.raises(UsageError, match=r"--threshold None → 0\.3") as refused:
        run_predict(predict_config(checkpoint, out, src=raw, resume=True, threshold=0.3, **QUICK))
    assert "threshold applied" in str(refused.value) and "--multiview" not in str(refused.value)
    with pytest.raises(UsageError, match="--multiview 1 → 6"):
        run_predict(
            predict_config(checkpoint, out, src=raw, resume=True, **{**QUICK, "multiview": 6})
        )
    torch.manual_seed(1)
    other = save_model(
        build_classifier("tiny", num_classes=2, **SMALL_MODEL), tmp_path / "other.safetensors"
    )
    with pytest.raises(UsageError, match="checkpoint sha256"):
        run_predict(predict_config(other, out, src=raw, resume=True, **QUICK))
    # The same checkpoint's bytes in another folder, another batch size and worker count:
    # nothing left to do, the same report.
    moved = tmp_path / "moved"
    shutil.copytree(checkpoint.parent, moved)
    renamed = moved / checkpoint.name
    cut = count_cuts(monkeypatch)
    settings = {**QUICK, "batch_size": 2}
    run_predict(predict_config(renamed, out, src=raw, resume=True, workers=0, **settings))
    assert cut == []
    assert (out / "predictions.csv").read_bytes() == (sequential / "predictions.csv").read_bytes()


def test_a_bad_scan_and_a_dying_worker_fail_alone_under_workers(
    raw, checkpoint, tmp_path, monkeypatch
):
    from vctmae.predict import run

    src = linked_source(tmp_path / "src", raw, CASES)
    (src / "ct" / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    (src / "seg" / "broken.nii.gz").symlink_to(raw / "seg" / "case000.nii.gz")
    cut = run.cut_scan

    def crashing(case, *args, **kwargs):
        if case.case == "case001":
            os._exit(1)  # the worker process dies, as when killed for memory
        return cut(case, *args, **kwargs)

    # The workers are forked inside the run: they inherit the crashing reader.
    monkeypatch.setattr(run, "cut_scan", crashing)
    out = tmp_path / "out"
    result = cli("predict", "--checkpoint", str(checkpoint), "--src", str(src), "--out", str(out),
                 "--device", "cpu", "--workers", "2", "--no-attention", "--multiview", "1",
                 "--batch-size", "5")  # fmt: skip
    assert result.exit_code == 1, result.output
    lines = error_lines(result.output)
    assert len(lines) == 3, result.output
    assert any("ct/broken.nii.gz" in line for line in lines)
    assert any("case001.nii.gz: the worker process died" in line for line in lines)
    assert "2 scan(s) failed" in lines[-1] and "Traceback" not in result.output
    summary = json.loads((out / "summary.json").read_text())
    status = {scan["case"]: scan["status"] for scan in summary["scans"]}
    assert status == {"broken": "failed", "case000": "ok", "case001": "failed", "case002": "ok"}


def test_the_index_lists_every_scan_highest_probability_first(sequential, tmp_path):
    from vctmae.predict import report
    from vctmae.predict.results import ScanResult

    summary = json.loads((sequential / "summary.json").read_text())
    scans = [ScanResult.from_json(scan) for scan in summary["scans"]]
    # A failed scan and many copies of the others, as in an archive.
    failed = ScanResult(case="bad", folder="bad", ct="bad.nii.gz", seg="", status="failed",
                        error="bad.nii.gz: not a NIfTI file")  # fmt: skip
    many = [
        ScanResult.from_json({**scan.to_json(), "case": f"{scan.case}-{copy}"})
        for copy in range(60)
        for scan in scans
    ]
    facts = report.RunFacts(**{**summary["run"], "threshold": _threshold(summary)})
    page = report.index_page([failed, *many], facts)
    rows = re.findall(r"<tr data-kind=\"(\w+)\"><td>(.*?)</td><td data-sort=\"([-\d.]+)\"", page)
    assert len(rows) == len(many) + 1
    names = [re.sub(r"<[^>]+>", "", name) for _, name, _ in rows]
    assert sorted(names) == sorted([scan.case for scan in many] + ["bad"])
    highest = [float(value) for _, _, value in rows]
    expected = sorted((max(v.prob_fracture for v in scan.vertebrae) for scan in many), reverse=True)
    assert highest[:-1] == pytest.approx(expected, abs=1e-6) and rows[-1][0] == "failed"
    suspected = sum(bool(scan.fractured) for scan in many)
    assert f"{len(many) + 1} scan(s): fracture suspected in {suspected}," in page
    assert "failed 1." in page and "<script>" in page and "http" not in page.split("<script>")[1]


def _threshold(summary: dict):
    from vctmae.infer.threshold import ThresholdChoice

    return ThresholdChoice(**summary["run"]["threshold"])


def test_the_overview_from_the_volumes_around_the_spine_is_the_whole_volumes_one(
    raw, sequential, tmp_path
):
    from vctmae.ingest.geometry import read_ct, read_label_map
    from vctmae.ingest.levels import SCHEMES
    from vctmae.predict.pictures import overview_svg
    from vctmae.predict.results import ScanResult
    from vctmae.predict.run import around_spine

    summary = json.loads((sequential / "summary.json").read_text())
    scan = ScanResult.from_json(summary["scans"][0])
    ct, labels = read_ct(raw / "ct" / f"{scan.case}.nii.gz"), read_label_map(raw / scan.seg)
    values = {name: value for value, name in SCHEMES[scan.scheme].items()}
    small_ct, small_labels = around_spine(ct, labels, list(values.values()))
    assert small_ct.data.size < ct.data.size and small_labels.data.shape == small_ct.data.shape

    def drawn(ct, labels, name: str) -> str:
        path = overview_svg(ct, labels, scan.vertebrae, values, scan.not_assessed, 0.5,
                            tmp_path / name, title="overview")  # fmt: skip
        # Everything but the time it was drawn and the ids of its elements.
        text = re.sub(r"<dc:date>.*?</dc:date>", "", path.read_text(), flags=re.S)
        for number, name in enumerate(re.findall(r'id="([^"]+)"', text)):
            text = re.sub(rf"\b{re.escape(name)}\b", f"id{number}", text)
        return text

    whole = drawn(ct, labels, "whole.svg")
    assert "data:image/png;base64," in whole
    assert drawn(small_ct, small_labels, "small.svg") == whole


def test_the_default_worker_count_leaves_a_cpu_model_every_core(checkpoint, tmp_path):
    """On the CPU the model gets every core (scans read and cut in this process); with a GPU,
    worker processes read and cut ahead of it."""
    from vctmae.ingest.extract import InProcess, ProcessPool
    from vctmae.predict.run import _executor

    config = predict_config(checkpoint, tmp_path / "out", src=tmp_path)
    assert isinstance(_executor(config, jobs=8), InProcess)
    on_gpu = _executor(dataclasses.replace(config, device="cuda"), jobs=8)
    try:
        assert isinstance(on_gpu, ProcessPool)
    finally:
        on_gpu.close()
    asked = _executor(dataclasses.replace(config, workers=2), jobs=8)
    try:
        assert isinstance(asked, ProcessPool)
    finally:
        asked.close()
