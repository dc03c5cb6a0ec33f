"""The measuring every benchmark shares, and one format for its result.

Each `vctmae bench …` command measures a candidate and its baselines in the same
run: it times them with `time_calls` (warm-up outside the clock, the device's
queued work waited for inside it), collects the numbers in a `Report`, and
writes it once: the report records where the numbers came from (machine,
versions, git commit, how busy the machine was), prints a table and writes JSON.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vctmae.files import write_atomically
from vctmae.provenance import git_commit, machine_info, versions

DEFAULT_DIR = Path("benchmarks/results")
# The real CT fixture (ct.nii.gz + seg.nii.gz) beside the checkout, or $VCTMAE_REAL_CT.
REAL_CT_DIR = Path(
    os.environ.get("VCTMAE_REAL_CT", Path(__file__).resolve().parents[3] / "shared/data/real-ct")
)


def bench_device(name: str | None) -> Any:
    """The torch device a benchmark runs on: `name`, or cuda when present, else the CPU."""
    import torch

    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def sync(device: Any) -> None:
    """Wait for the work queued on a CUDA device (deliberate: a timing ends when it is done)."""
    if device is not None and device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def time_calls(
    run: Callable[[], Any],
    *,
    device: Any = None,
    warmup: int = 1,
    repeats: int = 3,
    calls: int = 1,
    min_seconds: float = 0.0,
) -> list[float]:
    """Seconds per call of `run()`, one number per repeat, after `warmup` untimed calls.

    Each repeat calls `run` at least `calls` times and for at least `min_seconds`, and is
    divided by the calls it made; work queued on `device` is finished before the clock stops.
    """
    for _ in range(warmup):
        run()
    sync(device)
    seconds = []
    for _ in range(repeats):
        made = 0
        start = time.perf_counter()
        while True:
            run()
            made += 1
            if made < calls:
                continue
            sync(device)
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        seconds.append(elapsed / made)
    return seconds


class Report:
    """A benchmark's numbers, collected while it runs and written once by `write`.

    `results` are {name, value, unit} rows, e.g. ("torch_w2", 812.0, "samples/s"); `ratios` keys
    read "<candidate>_over_<baseline>", both measured in this run. Made at the start of a run,
    it records the load average then and at `write`: other jobs on a shared machine slow every
    contender alike, the ratios of rates measured in one run less.
    """

    def __init__(self, benchmark: str) -> None:
        self.benchmark = benchmark
        self.results: list[dict[str, Any]] = []
        self.ratios: dict[str, float] = {}
        self.load_before = os.getloadavg()

    def add(self, name: str, value: float, unit: str) -> None:
        self.results.append({"name": name, "value": float(value), "unit": unit})

    def write(
        self,
        *,
        json_path: Path | str | None = None,
        config: dict[str, Any] | None = None,
        quiet: bool = False,
    ) -> Path:
        """Print the table and write the JSON report (default:
        benchmarks/results/<benchmark>.json); returns its path."""
        report = {
            "benchmark": self.benchmark,
            "machine": machine_info(),
            "versions": versions(),
            "git_commit": git_commit(),
            "config": {
                **(config or {}),
                "load_avg_before": [round(x, 2) for x in self.load_before],
                "load_avg_after": [round(x, 2) for x in os.getloadavg()],
            },
            "results": self.results,
            "ratios": {k: float(v) for k, v in self.ratios.items()},
        }
        path = Path(json_path) if json_path else DEFAULT_DIR / f"{self.benchmark}.json"
        write_atomically(path, (json.dumps(report, indent=2) + "\n").encode())
        if not quiet:
            _print_table(report, path)
        return path


def _print_table(report: dict[str, Any], path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"bench {report['benchmark']} — {report['machine']['cpu']}"
        + (f" + {report['machine']['gpu']}" if report["machine"]["gpu"] else "")
    )
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("unit")
    for r in report["results"]:
        table.add_row(r["name"], f"{r['value']:,.3f}", r["unit"])
    for name, value in report["ratios"].items():
        table.add_row(name, f"{value:,.3f}", "×")
    console = Console()
    console.print(table)
    console.print(f"wrote {path}")
