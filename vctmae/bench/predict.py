"""`vctmae bench predict`: seconds per scan of `vctmae predict`, against ingest + eval of the
same scans and against the model's own floor, in the same run.

Inputs: spine phantoms with their label maps (`vctmae.synth.phantoms.write_phantoms`;
`--clinical`: clinical-size ones, 512 × 512 × ~330 voxels), so no segmentation is
timed. The model: a randomly initialised classifier of the chosen preset (`tiny` on
the CPU; its speed does not depend on its weights).

Measured, after one untimed warm-up scan (model load, first kernels):
1. `predict` — `run_predict` as the command runs it: read, crops in memory, model
   (`--multiview`), attention maps, pictures and pages; s/scan, and the mean of
   each stage from its summary.json.
2. `predict_no_attention` — the same with `--no-attention` (no attention maps and
   frame pictures; the overview and pages still drawn).
3. `ingest_eval` — the baseline, what a user did before predict existed:
   `run_ingest` (one worker, as predict is one process) into shards + Zarr, then
   `run_eval` of the checkpoint on those shards (same views, same device).
4. `model_floor` — the floor: the classifier's forward passes alone on the same crops
   (`model_floor`: predict's module, precision, views and batches), so what predict
   adds (reading, cutting, drawing) is a number: `predict_no_attention_overhead`.
Ratios `predict_over_*` are of seconds per scan (below 1: predict is faster).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from vctmae.bench.report import Result, write_report
from vctmae.errors import UsageError

STAGES = ("read_and_crop", "model", "attention", "report", "total")


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
    """Two small phantoms: about a minute on a 2-core machine."""
    return PredictBenchConfig(**{"scans": 2, **changes})


def _timed(run) -> tuple[float, object]:
    started = time.perf_counter()
    value = run()
    return time.perf_counter() - started, value


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
    sampler = FrameSampler(mode=config.frames, volume=predictor.model.config.volume)
    inputs = []
    for crops in scans.values():
        for start in range(0, len(crops), config.batch_size):
            batch = torch.from_numpy(np.stack(crops[start : start + config.batch_size]))
            batch = batch.to(predictor.device)
            shifts, _ = sampler.view_table(batch, None, config.multiview)
            inputs += [
                sampler.view_input(batch, None, shifts[:, v]) for v in range(shifts.shape[1])
            ]

    def forward_all() -> None:
        with torch.no_grad():
            for view_crops, view_frames in inputs:
                with autocast_context(predictor.device, predictor.precision):
                    predictor.module(view_crops, view_frames)
        if predictor.device.type == "cuda":
            torch.cuda.synchronize(predictor.device)

    forward_all()  # warm-up: first kernels, allocator
    # The best of three: on a shared machine a burst of other work lands in one of them.
    return min(_timed(forward_all)[0] for _ in range(3))


def run_predict_bench(config: PredictBenchConfig, *, json_path: Path | None = None) -> Path:
    """Run the benchmark (module docstring); writes and returns the JSON report."""
    import torch

    from vctmae.clip import REFERENCE_LEVELS
    from vctmae.data.options import LoaderOptions
    from vctmae.infer.config import EvalConfig
    from vctmae.infer.evaluate import run_eval
    from vctmae.ingest.pipeline import IngestConfig, run_ingest
    from vctmae.model import build_classifier
    from vctmae.model.checkpoint import save_model
    from vctmae.predict.config import PredictConfig
    from vctmae.predict.report import SUMMARY
    from vctmae.predict.run import run_predict
    from vctmae.synth import SynthConfig
    from vctmae.synth.phantoms import write_phantoms

    load_before = os.getloadavg()
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

        def predict(out: Path, src: Path, **changes) -> dict:
            run_predict(predict_config(out, src, **changes))
            return json.loads((out / SUMMARY).read_text())

        predict(root / "warm-report", warm)
        results: list[Result] = []
        per_scan: dict[str, float] = {}
        for name, changes in (("predict", {}), ("predict_no_attention", {"attention": False})):
            seconds, summary = _timed(
                lambda c=changes, n=name: predict(root / n, root / "raw", **c)
            )
            if summary["scans_ok"] != config.scans:
                raise RuntimeError(f"{name}: {summary['scans_failed']} phantom scan(s) failed")
            per_scan[name] = seconds / config.scans
            results.append(Result(name=f"{name}_s_per_scan", value=per_scan[name], unit="s/scan"))
            for stage in STAGES:
                times = [scan["timings_s"].get(stage, 0.0) for scan in summary["scans"]]
                results.append(
                    Result(
                        name=f"{name}_{stage}_mean", value=sum(times) / len(times), unit="s/scan"
                    )
                )
            vertebrae = summary["vertebrae_assessed"]

        from vctmae.ingest.geometry import GeometryConfig
        from vctmae.ingest.levels import parse_levels

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

        seconds, _ = _timed(ingest_and_eval)
        per_scan["ingest_eval"] = seconds / config.scans
        results.append(
            Result(name="ingest_eval_s_per_scan", value=per_scan["ingest_eval"], unit="s/scan")
        )
        shards = [str(p) for p in sorted((root / "data").glob("*.tar"))]
        floor = model_floor(predict_config(root / "floor", root / "raw"), shards)
        per_scan["model_floor"] = floor / config.scans
        results += [
            Result(name="model_floor_s_per_scan", value=per_scan["model_floor"], unit="s/scan"),
            Result(
                name="predict_no_attention_overhead_s_per_scan",
                value=per_scan["predict_no_attention"] - per_scan["model_floor"],
                unit="s/scan",
            ),
        ]
        results.append(Result(name="vertebrae_per_scan", value=vertebrae / config.scans, unit=""))
    ratios = {
        "predict_over_model_floor": per_scan["predict"] / per_scan["model_floor"],
        "predict_no_attention_over_model_floor": per_scan["predict_no_attention"]
        / per_scan["model_floor"],
        "predict_over_ingest_eval": per_scan["predict"] / per_scan["ingest_eval"],
        "predict_no_attention_over_ingest_eval": per_scan["predict_no_attention"]
        / per_scan["ingest_eval"],
    }
    name = "predict-clinical" if config.clinical else "predict"
    return write_report(
        name,
        results,
        ratios,
        json_path=json_path,
        config={
            **asdict(config),
            "torch_threads": torch.get_num_threads(),
            "load_average_before_after": [load_before[0], os.getloadavg()[0]],
            "note": "the machine may be shared with other jobs while measuring "
            "(load_average_*): they slow every contender alike, the ratios less",
            "segmentation": "not timed: the phantoms come with their label maps",
            "model_floor": "the floor: the classifier's forward passes alone (predict's module, "
            "precision and views; each scan's crops batched as predict batches them), on the "
            "same crops (ingest's, in memory), inputs prepared beforehand, best of 3 passes after "
            "an untimed one",
            "not_measured": None
            if (config.preset, config.device) == ("large", "cuda")
            else "ViT-L on a GPU: vctmae bench predict --preset large --device cuda",
        },
    )
