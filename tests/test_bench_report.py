"""The timing and report every `vctmae bench` command shares (`vctmae.bench.report`)."""

from __future__ import annotations

import json
import time

from vctmae.bench.report import Report, time_calls


def test_time_calls_gives_seconds_per_call_after_the_warmup():
    started: list[float] = []

    def run() -> None:
        started.append(time.perf_counter())
        time.sleep(0.01)

    seconds = time_calls(run, warmup=2, repeats=3, calls=2)
    assert len(started) == 2 + 3 * 2 and len(seconds) == 3
    # Per call, not per repeat of two calls: each call sleeps 10 ms.
    assert all(0.01 <= s < 0.01 * 2 * 50 for s in seconds)


def test_time_calls_repeats_a_short_call_for_min_seconds():
    made = []
    seconds = time_calls(lambda: made.append(1), warmup=0, repeats=1, min_seconds=0.05)
    assert len(made) > 1 and seconds[0] * len(made) >= 0.05


def test_a_report_records_its_numbers_provenance_and_load(tmp_path):
    report = Report("example")
    report.add("candidate", 2.0, "s")
    report.ratios["candidate_over_baseline"] = 3
    path = report.write(json_path=tmp_path / "out" / "example.json", config={"x": 1}, quiet=True)
    written = json.loads(path.read_text())
    assert written["benchmark"] == "example"
    assert written["results"] == [{"name": "candidate", "value": 2.0, "unit": "s"}]
    assert written["ratios"] == {"candidate_over_baseline": 3.0}
    assert written["config"]["x"] == 1
    assert (
        len(written["config"]["load_avg_before"]) == len(written["config"]["load_avg_after"]) == 3
    )
    assert {"cpu", "cores"} <= set(written["machine"]) and "torch" in written["versions"]
    # Written whole under its name (no temporary file left beside it).
    assert [p.name for p in path.parent.iterdir()] == ["example.json"]
