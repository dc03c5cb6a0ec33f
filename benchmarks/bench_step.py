"""Step benchmark (SPEC §9): `python benchmarks/bench_step.py [--json PATH] [--quick]`.

Same as `vctmae bench step`: samples/s of pretraining and finetuning steps,
tiny preset on CPU, vs an eager fp32 baseline measured in the same run.
"""

import argparse
from pathlib import Path

from vctmae.train.bench import run_step_benchmark

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--json", type=Path, default=None, help="report path (default benchmarks/results/step.json)"
    )
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    args = parser.parse_args()
    run_step_benchmark(json_path=args.json, quick=args.quick)
