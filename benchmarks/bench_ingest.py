"""Ingest benchmark: cases/s and crops/s at 1 and N workers, peak memory (same as `vctmae bench ingest`)."""

import argparse
from pathlib import Path

from vctmae.ingest.bench import run_bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", type=Path, default=None, help="output JSON path")
    parser.add_argument(
        "--quick", action="store_true", help="few small cases, about a minute on 2 cores"
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="parallel worker count (default: cores)"
    )
    parser.add_argument(
        "--cases", type=int, default=None, help="synthetic cases (default 4 quick / 16)"
    )
    args = parser.parse_args()
    run_bench(json_path=args.json, quick=args.quick, workers=args.workers, cases=args.cases)
