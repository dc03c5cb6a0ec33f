"""`vctmae bench ingest`: ingest throughput on synthetic phantoms at 1 and N workers, and peak memory.

Each configuration runs `vctmae ingest` as a child process on the same
phantoms (fresh output folder, so every case is extracted), while a sampler
sums the resident memory of that process and all its descendants every 50 ms
(the workers' memory counts, as it does on a real machine). Throughput comes
from the run's own report: cases/s and crops/s of the extract phase, plus the
end-to-end wall time that includes assembly. The configurations alternate for
`rounds` rounds and each keeps its best round (peak memory: the highest). A
second N-worker run on half the cases shows whether peak memory stays flat as
the case count grows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from vctmae.bench.report import Result, write_report
from vctmae.ingest.pipeline import default_workers

PAGE = os.sysconf("SC_PAGE_SIZE")


def _children(pid: int, parent_of: dict[int, int]) -> set[int]:
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parent_of.items():
            if ppid == parent and child not in tree:
                tree.add(child)
                frontier.append(child)
    return tree


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants (Linux /proc)."""
    parent_of: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # Field 4 (ppid) follows the parenthesised command name, which may hold spaces.
        parent_of[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    total = 0
    for member in _children(pid, parent_of):
        try:
            total += int(Path(f"/proc/{member}/statm").read_text().split()[1]) * PAGE
        except OSError:
            continue
    return total


def measure_ingest(src: Path, out: Path, workers: int) -> dict:
    """Run `vctmae ingest` in a child process; returns its report plus wall time and peak tree RSS."""
    command = [
        sys.executable,
        "-m",
        "vctmae",
        "ingest",
        "--src",
        str(src),
        "--out",
        str(out),
        "--labels",
        str(src / "labels.csv"),
        "--workers",
        str(workers),
        "--no-progress",
    ]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(process.pid))
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = process.communicate()
    done.set()
    sampler.join()
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(
            f"ingest failed (exit {process.returncode}):\n{stderr.decode(errors='replace')}"
        )
    report = json.loads((out / "ingest-report.json").read_text())
    return {"report": report, "wall_s": wall, "peak_rss": peak}


def run_bench(
    *,
    json_path: Path | None = None,
    quick: bool = False,
    workers: int | None = None,
    cases: int | None = None,
    rounds: int | None = None,
) -> Path:
    from vctmae.ingest.synth import write_phantoms

    n_cases = cases or (4 if quick else 16)
    rounds = rounds or (1 if quick else 2)
    n_workers = workers or default_workers()
    results: list[Result] = []
    measured: dict[int, dict] = {}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="vctmae-bench-ingest-") as tmp:
        root = Path(tmp)
        src = root / "raw"
        write_phantoms(src, cases=n_cases, seed=0)
        # Alternate the configurations and keep each one's best round: on a shared
        # machine other jobs slow some rounds down, never speed one up.
        for round_index in range(rounds):
            for w in sorted({1, n_workers}):
                run = measure_ingest(src, root / f"out-w{w}-r{round_index}", w)
                best = measured.get(w)
                if best is None or run["report"]["crops_per_s"] > best["report"]["crops_per_s"]:
                    measured[w] = {
                        **run,
                        "peak_rss": max(run["peak_rss"], best["peak_rss"] if best else 0),
                    }
                elif run["peak_rss"] > best["peak_rss"]:
                    best["peak_rss"] = run["peak_rss"]
        for w in sorted(measured):
            run, report = measured[w], measured[w]["report"]
            results += [
                Result(name=f"cases_per_s_w{w}", value=report["cases_per_s"], unit="cases/s"),
                Result(name=f"crops_per_s_w{w}", value=report["crops_per_s"], unit="crops/s"),
                Result(name=f"wall_s_w{w}", value=run["wall_s"], unit="s"),
                Result(name=f"assemble_s_w{w}", value=report["timings_s"]["assemble"], unit="s"),
                Result(name=f"peak_tree_rss_w{w}", value=run["peak_rss"] / 2**20, unit="MiB"),
            ]
        ratios = (
            {
                f"w{n_workers}_over_w1": measured[n_workers]["report"]["crops_per_s"]
                / measured[1]["report"]["crops_per_s"]
            }
            if n_workers != 1
            else {}
        )
        if not quick and n_cases >= 4:
            half = root / "raw-half"
            write_phantoms(half, cases=n_cases // 2, seed=0)
            run = measure_ingest(half, root / "out-half", n_workers)
            results.append(
                Result(
                    name=f"peak_tree_rss_w{n_workers}_half_cases",
                    value=run["peak_rss"] / 2**20,
                    unit="MiB",
                )
            )
            ratios["peak_rss_full_over_half_cases"] = (
                measured[n_workers]["peak_rss"] / run["peak_rss"]
            )
        crops = measured[n_workers]["report"]["vertebrae_written"]
    return write_report(
        "ingest",
        results,
        ratios,
        json_path=json_path,
        config={
            "cases": n_cases,
            "crops": crops,
            "workers": n_workers,
            "quick": quick,
            "rounds": rounds,
            "phantom_seed": 0,
            "crop_size": 96,
            "spacing_mm": 1.0,
            # On a shared machine other jobs compete for the cores: record how busy it was.
            "load_avg_1min_before": round(load_before, 2),
            "load_avg_1min_after": round(os.getloadavg()[0], 2),
            "note": "rates are of the extract phase (geometry + compression in workers); "
            "wall includes process start, discovery and assembly",
        },
    )
