"""`vctmae bench predict`: seconds per scan of `vctmae predict` as it runs by default, against
the sequential fp32 predict, ingest + eval of the same scans and the model's own floor, in the
same run.

Inputs: spine phantoms with their label maps (`vctmae.synth.phantoms.write_phantoms`;
`--clinical`: clinical-size ones, 512 × 512 × ~330 voxels), so no segmentation is
timed. The model: a randomly initialised classifier of the chosen preset (`tiny` on
the CPU; its speed does not depend on its weights).

Measured, after one untimed warm-up scan (model load, first kernels):
1. `predict` — `run_predict` as the command runs it by default: read, crops in memory, model
   (`--multiview`) with the attention maps of the middle view from the same pass, pictures
   and pages; s/scan, scans/hour, and the mean of each stage from its summary.json.
2. `predict_no_attention` — the same with `--no-attention` (no attention maps and
   frame pictures; the overview and pages still drawn).
3. `sequential_fp32` — predict with `SEQUENTIAL_FP32`'s options: fp32, one scan after another.
   The largest difference of a probability from the default's is `max_abs_dp_...`.
4. `ingest_eval` — what a user ran before predict existed: `run_ingest` (one worker, as
   predict is one process) into shards + Zarr, then `run_eval` of the checkpoint on those
   shards (same views, same device).
5. `model_floor` — the floor: the classifier's forward passes alone on the same crops
   (`model_floor`: predict's module, precision, views and batches), so what predict
   adds (reading, cutting, drawing) is a number: `predict_no_attention_overhead`.
6. The first scan of a fresh process (`vctmae predict` in a new Python process over two
   scans, `--no-attention`): its seconds against the second scan's, with numba's cache of
   the compiled sampler empty and filled (`first_scan_cost`).
7. `bf16_vs_fp32_max_abs_dp`: the preset's classifier (random weights) on the first scan's
   crops in bf16 autocast and in fp32, the largest difference of a probability.
Each ratio's meaning is written beside it in the JSON (`config.ratios`).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from vctmae.bench.report import Report, time_calls
from vctmae.errors import UsageError
from vctmae.infer.config import SpeedOptions

STAGES = ("read_and_crop", "model", "report", "total")
# The baseline's options (PredictConfig fields): predict in fp32, one scan after another.
SEQUENTIAL_FP32 = {"speed": SpeedOptions(precision="fp32"), "workers": 0}
# The crops of the bf16-vs-fp32 agreement (the first scan's, at most this many).
AGREEMENT_CROPS = 6


@dataclass(frozen=True, kw_only=True)
class PredictBenchConfig:
    """What the predict benchmark runs."""

    scans: int = 6
    clinical: bool = False
    preset: str = "tiny"
    device: str = "cpu"
    multiview: int = 6
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.scans < 1:
            raise UsageError(f"--scans must be >= 1, got {self.scans}")
        if self.multiview not in (1, 6):
            raise UsageError(f"--multiview must be 1 or 6, got {self.multiview}")


def quick_config(**changes) -> PredictBenchConfig:
    """Two small phantoms: a few minutes on a 2-core machine."""
    return PredictBenchConfig(**{"scans": 2, **changes})


def model_floor(config, shards: list[str]) -> float:
    """Seconds of the classifier's forward passes alone over the crops in `shards`: predict's
    module, precision and views (`Predictor`), each scan's crops in batches of
    `config.batch_size` as predict batches them; the inputs are made before the clock starts;
    best of three passes."""
    import torch

    from vctmae.data.frames import FrameSampler
    from vctmae.data.shards import iter_raw
    from vctmae.infer.device import autocast_context
    from vctmae.predict.run import Predictor

    predictor = Predictor(config)
    scans: dict[str, list[np.ndarray]] = {}
    for key, crop in iter_raw(shards):
        scans.setdefault(key.rsplit("_", 1)[0], []).append(crop)
    # Predict's clip rule (the checkpoint's unless the options say otherwise): crop mode here,
    # as the crops come without their mask boxes.
    rule = predictor.rule
    sampler = FrameSampler(mode=rule.frames, volume=predictor.model.config.volume)
    inputs = []
    for crops in scans.values():
        for start in range(0, len(crops), config.batch_size):
            batch = torch.from_numpy(np.stack(crops[start : start + config.batch_size]))
            batch = batch.to(predictor.device)
            shifts, _ = sampler.view_table(batch, None, rule.multiview)
            inputs += [
                sampler.view_input(batch, None, shifts[:, v]) for v in range(shifts.shape[1])
            ]

    def forward_all() -> None:
        with torch.no_grad():
            for view_crops, view_frames in inputs:
                with autocast_context(predictor.device, predictor.precision):
                    predictor.module(view_crops, view_frames)

    # The best of three after a warm-up (first kernels, allocator): on a shared machine a burst
    # of other work lands in one of them.
    return min(time_calls(forward_all, device=predictor.device, warmup=1, repeats=3))


def bf16_agreement(config, shards: list[str]) -> float:
    """The largest |P(fracture) in bf16 autocast − in fp32| of predict's classifier over the first
    crops of `shards` (at most AGREEMENT_CROPS; the rule's views combined, `Predictor.assess`)."""
    import itertools

    from vctmae.data.shards import iter_raw
    from vctmae.predict.run import Predictor

    predictor = Predictor(config)
    crops = [crop for _, crop in itertools.islice(iter_raw(shards), AGREEMENT_CROPS)]
    # The crops come without their mask boxes: each box is the whole crop.
    boxes = [(0, crops[0].shape[0]) * 3] * len(crops)
    probs = {}
    for precision in ("bf16", "fp32"):
        predictor.precision = precision
        probs[precision], _ = predictor.assess(crops, boxes, attention=False)
    return float(np.abs(probs["bf16"] - probs["fp32"]).max())


def first_scan_cost(
    config: PredictBenchConfig, checkpoint: Path, src: Path, out: Path, numba_cache: Path
) -> dict[str, float]:
    """`vctmae predict --no-attention` in a fresh process over the two scans under `src`, with
    numba's cache in `numba_cache`: the process's wall seconds and each scan's (summary.json)."""
    from vctmae.predict.report import SUMMARY

    command = [
        sys.executable, "-m", "vctmae", "predict", "--checkpoint", str(checkpoint),
        "--src", str(src), "--out", str(out), "--device", config.device,
        "--multiview", str(config.multiview), "--batch-size", str(config.batch_size),
        "--no-attention", "--no-progress",
    ]  # fmt: skip
    environment = {**os.environ, "NUMBA_CACHE_DIR": str(numba_cache)}
    [wall] = time_calls(
        lambda: subprocess.run(command, env=environment, check=True), warmup=0, repeats=1
    )
    first, second = (
        scan["timings_s"]["total"] for scan in json.loads((out / SUMMARY).read_text())["scans"]
    )
    return {"wall": wall, "first": first, "second": second}


def _probabilities(out: Path) -> dict[str, float]:
    """Each vertebra's P(fracture) in a predict report's predictions.csv, by key."""
    from vctmae.predict.report import PREDICTIONS

    with open(out / PREDICTIONS, newline="") as table:
        return {row["key"]: float(row["prob_fracture"]) for row in csv.DictReader(table)}


def run_predict_bench(config: PredictBenchConfig, *, json_path: Path | None = None) -> Path:
    """Run the benchmark (module docstring); writes and returns the JSON report."""
    import torch

    from vctmae.clip import REFERENCE_LEVELS
    from vctmae.data.options import LoaderOptions
    from vctmae.infer.config import EvalConfig
    from vctmae.infer.evaluate import run_eval
    from vctmae.ingest.geometry import GeometryConfig
    from vctmae.ingest.levels import parse_levels
    from vctmae.ingest.pipeline import IngestConfig, run_ingest
    from vctmae.model import build_classifier
    from vctmae.model.checkpoint import save_model
    from vctmae.predict.config import PredictConfig
    from vctmae.predict.report import SUMMARY
    from vctmae.predict.run import run_predict
    from vctmae.synth import SynthConfig
    from vctmae.synth.phantoms import write_phantoms

    report = Report("predict-clinical" if config.clinical else "predict")
    with tempfile.TemporaryDirectory(prefix="vctmae-bench-predict-") as tmp:
        root = Path(tmp)
        # One more phantom than timed: the warm-up scan.
        write_phantoms(
            SynthConfig(
                out=root / "raw", cases=config.scans + 1, seed=config.seed, clinical=config.clinical
            )
        )
        warm = root / "warm"
        (warm / "ct").mkdir(parents=True)
        (warm / "seg").mkdir()
        first = sorted((root / "raw" / "ct").iterdir())[0]
        for folder in ("ct", "seg"):
            (root / "raw" / folder / first.name).rename(warm / folder / first.name)
        torch.manual_seed(config.seed)
        checkpoint = save_model(
            build_classifier(config.preset, num_classes=2), root / "model.safetensors"
        )

        def predict_config(out: Path, src: Path, **changes) -> PredictConfig:
            return PredictConfig(
                checkpoint=checkpoint,
                src=src,
                out=out,
                device=config.device,
                multiview=config.multiview,
                batch_size=config.batch_size,
                progress=False,
                **changes,
            )

        run_predict(predict_config(root / "warm-report", warm))
        per_scan: dict[str, float] = {}
        precision_ran: dict[str, str] = {}
        runs = {
            "predict": {},
            "predict_no_attention": {"attention": False},
            "sequential_fp32": SEQUENTIAL_FP32,
        }
        for name, changes in runs.items():
            [seconds] = time_calls(
                lambda c=changes, n=name: run_predict(predict_config(root / n, root / "raw", **c)),
                warmup=0,
                repeats=1,
            )
            summary = json.loads((root / name / SUMMARY).read_text())
            if summary["scans_ok"] != config.scans:
                raise RuntimeError(f"{name}: {summary['scans_failed']} phantom scan(s) failed")
            per_scan[name] = seconds / config.scans
            precision_ran[name] = summary["run"]["precision"]
            report.add(f"{name}_s_per_scan", per_scan[name], "s/scan")
            report.add(f"{name}_scans_per_hour", 3600 / per_scan[name], "scans/h")
            for stage in STAGES:
                times = [scan["timings_s"].get(stage, 0.0) for scan in summary["scans"]]
                report.add(f"{name}_{stage}_mean", sum(times) / len(times), "s/scan")
            vertebrae = summary["vertebrae_assessed"]
        default, baseline = (
            _probabilities(root / "predict"),
            _probabilities(root / "sequential_fp32"),
        )
        largest = max(abs(default[key] - baseline[key]) for key in baseline)
        report.add("max_abs_dp_predict_vs_sequential_fp32", largest, "")

        # A fresh process's first scan, numba's cache of the compiled sampler empty, then filled.
        two = root / "two-scans"
        for folder in ("ct", "seg"):
            (two / folder).mkdir(parents=True)
            for scan in (warm / folder / first.name, sorted((root / "raw" / folder).iterdir())[0]):
                (two / folder / scan.name).symlink_to(scan)
        cache = root / "numba-cache"
        for state in ("empty_numba_cache", "filled_numba_cache"):
            seconds = first_scan_cost(config, checkpoint, two, root / f"fresh-{state}", cache)
            report.add(f"fresh_process_first_scan_s_{state}", seconds["first"], "s")
            report.add(f"fresh_process_second_scan_s_{state}", seconds["second"], "s")
            report.add(f"fresh_process_wall_s_{state}", seconds["wall"], "s")

        def ingest_and_eval() -> None:
            data = root / "data"
            geometry = GeometryConfig(levels=parse_levels(REFERENCE_LEVELS))
            run_ingest(
                IngestConfig(
                    src=root / "raw", out=data, geometry=geometry, workers=1, progress=False
                )
            )
            run_eval(
                EvalConfig(
                    checkpoint=checkpoint,
                    shards=tuple(str(p) for p in sorted(data.glob("*.tar"))),
                    out=root / "eval",
                    multiview=config.multiview,
                    batch_size=config.batch_size,
                    loader=LoaderOptions(workers=0),
                    device=config.device,
                    progress=False,
                )
            )

        [seconds] = time_calls(ingest_and_eval, warmup=0, repeats=1)
        per_scan["ingest_eval"] = seconds / config.scans
        report.add("ingest_eval_s_per_scan", per_scan["ingest_eval"], "s/scan")
        shards = [str(p) for p in sorted((root / "data").glob("*.tar"))]
        floor = model_floor(predict_config(root / "floor", root / "raw"), shards)
        per_scan["model_floor"] = floor / config.scans
        report.add("model_floor_s_per_scan", per_scan["model_floor"], "s/scan")
        overhead = per_scan["predict_no_attention"] - per_scan["model_floor"]
        report.add("predict_no_attention_overhead_s_per_scan", overhead, "s/scan")
        agreement = bf16_agreement(predict_config(root / "agree", root / "raw"), shards)
        report.add("bf16_vs_fp32_max_abs_dp", agreement, "")
        report.add("vertebrae_per_scan", vertebrae / config.scans, "")
    report.ratios = {
        "predict_over_sequential_fp32": per_scan["sequential_fp32"] / per_scan["predict"],
        "predict_attention_over_predict_no_attention": per_scan["predict"]
        / per_scan["predict_no_attention"],
        "predict_over_model_floor": per_scan["predict"] / per_scan["model_floor"],
        "predict_no_attention_over_model_floor": per_scan["predict_no_attention"]
        / per_scan["model_floor"],
        "predict_over_ingest_eval": per_scan["predict"] / per_scan["ingest_eval"],
        "predict_no_attention_over_ingest_eval": per_scan["predict_no_attention"]
        / per_scan["ingest_eval"],
    }
    return report.write(
        json_path=json_path,
        config={
            **asdict(config),
            "torch_threads": torch.get_num_threads(),
            "note": "the machine may be shared with other jobs while measuring "
            "(load_avg_*): they slow every contender alike, the ratios less",
            "precision_ran": precision_ran,
            "sequential_fp32": {key: str(value) for key, value in SEQUENTIAL_FP32.items()},
            "ratios": {
                "predict_over_sequential_fp32": "speed-up: the sequential fp32 predict's s/scan "
                "over the default predict's (above 1: the default is faster)",
                "predict_attention_over_predict_no_attention": "s/scan with the attention "
                "pictures over s/scan without (the cost of the pictures: maps and drawing)",
                "the others": "s/scan of predict over s/scan of the named baseline (below 1: "
                "predict is faster)",
            },
            "segmentation": "not timed: the phantoms come with their label maps",
            "model_floor": "the floor: the classifier's forward passes alone (predict's module, "
            "precision and views; each scan's crops batched as predict batches them), on the "
            "same crops (ingest's, in memory), inputs prepared beforehand, best of 3 passes after "
            "an untimed one",
            "first_scan": "a fresh `vctmae predict --no-attention` process over two scans: each "
            "scan's seconds (summary.json) and the process's wall time, first with numba's cache "
            "of the compiled ingest loops empty, then filled by that run",
            "bf16_vs_fp32": f"the {config.preset} classifier with random weights on the first "
            f"{AGREEMENT_CROPS} crops, the rule's views combined, bf16 autocast vs fp32",
            "not_measured": None
            if (config.preset, config.device) == ("large", "cuda")
            else "ViT-L on a GPU: vctmae bench predict --preset large --device cuda",
        },
    )
