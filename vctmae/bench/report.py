"""One format for every benchmark's result.

Each `vctmae bench …` command measures a candidate and its baseline in the same
run, then calls `write_report`, which records where the numbers came from
(machine, versions, git commit), prints a table and writes JSON.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vctmae.provenance import git_commit, machine_info, versions

DEFAULT_DIR = Path("benchmarks/results")
# The real CT fixture (ct.nii.gz + seg.nii.gz) beside the checkout, or $VCTMAE_REAL_CT.
REAL_CT_DIR = Path(
    os.environ.get("VCTMAE_REAL_CT", Path(__file__).resolve().parents[3] / "shared/data/real-ct")
)


@dataclass(frozen=True, kw_only=True)
class Result:
    """One measured number, e.g. Result(name="torch_w2", value=812.0, unit="samples/s")."""

    name: str
    value: float
    unit: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": float(self.value), "unit": self.unit}


def write_report(
    benchmark: str,
    results: list[Result],
    ratios: dict[str, float],
    *,
    json_path: Path | str | None = None,
    config: dict[str, Any] | None = None,
    quiet: bool = False,
) -> Path:
    """Print a table of `results` and `ratios` and write the JSON report.

    `ratios` keys read "<candidate>_over_<baseline>", both measured in this run.
    Returns the path written (default: benchmarks/results/<benchmark>.json).
    """
    report = {
        "benchmark": benchmark,
        "machine": machine_info(),
        "versions": versions(),
        "git_commit": git_commit(),
        "config": config or {},
        "results": [r.as_dict() for r in results],
        "ratios": {k: float(v) for k, v in ratios.items()},
    }
    path = Path(json_path) if json_path else DEFAULT_DIR / f"{benchmark}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)
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
