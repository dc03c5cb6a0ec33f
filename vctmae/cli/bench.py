"""`vctmae bench {ingest,loader,step,kernel,predict}`: every benchmark command, each calling one
module of `vctmae.bench`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from vctmae.cli.app import bench_app, expected_failures
from vctmae.errors import UsageError


def json_option(default: str) -> Any:
    """The `--json` option of a benchmark whose report goes to benchmarks/results/`default`."""
    return typer.Option(
        None,
        "--json",
        help=f"Where to write the JSON report (default benchmarks/results/{default}).",
    )


def quick_option(help: str) -> Any:
    return typer.Option(False, "--quick", help=help)


@bench_app.command("ingest")
def bench_ingest(
    json_path: Path | None = json_option("ingest-clinical.json"),
    quick: bool = quick_option("One clinical phantom as two cases: about a minute on 2 cores."),
    workers: int = typer.Option(
        None, "--workers", help="Parallel worker count to compare with 1 worker (default: cores)."
    ),
    cases: int = typer.Option(
        None, "--cases", help="Clinical-size cases to ingest (default 2 with --quick, else 8)."
    ),
) -> None:
    """Ingest at clinical size: s/case against a MONAI crop recipe and against only decoding the files (phantoms and a real-like CT), crops/s at 1 and N workers, peak memory, the projection for 3,446 CTs on 16 cores."""
    from vctmae.bench.ingest import run_bench

    with expected_failures():
        run_bench(json_path=json_path, quick=quick, workers=workers, cases=cases)


@bench_app.command("loader")
def bench_loader(
    json_path: Path | None = json_option("loader.json"),
    quick: bool = quick_option("Fewer crops and repeats: about a minute on a 2-core machine."),
    samples: int = typer.Option(
        None, "--samples", help="Number of crops to measure on (default 256, quick 64)."
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="Batch size of every contender."),
    device: str = typer.Option(
        None, "--device", help="Device the batches go to (default cuda when available, else cpu)."
    ),
    no_dali: bool = typer.Option(
        False, "--no-dali", help="Skip the DALI backend even when it is installed."
    ),
) -> None:
    """Samples/s from shards to device-ready batches (torch 0/1/2 workers, DALI) vs the paper code's MONAI data path and the raw tar read."""
    from vctmae.bench.loader import LoaderBenchConfig, quick_config, run_loader_bench

    overrides = {"batch_size": batch_size, "device": device, "dali": not no_dali}
    if samples is not None:
        overrides["samples"] = samples
    with expected_failures():
        config = quick_config(**overrides) if quick else LoaderBenchConfig(**overrides)
        run_loader_bench(config, json_path=json_path)


@bench_app.command("step")
def bench_step(
    json_path: Path | None = json_option("step.json"),
    quick: bool = quick_option("Fewer steps and cases (about a minute on 2 cores)."),
    preset: str | None = typer.Option(
        None, "--preset", help="Model preset (default: large on a GPU, tiny on the CPU)."
    ),
    device: str | None = typer.Option(
        None, "--device", help="cuda or cpu (default: cuda when present)."
    ),
    recipe: str | None = typer.Option(
        None, "--recipe", help="paper: also project the wall time of the paper's whole recipe."
    ),
) -> None:
    """Trainer.train_step of both trainers, timed: samples/s, spread, MFU; eager fp32 as the baseline."""
    from vctmae.bench.step import run_step_benchmark

    with expected_failures():
        if recipe not in (None, "paper"):
            raise UsageError(f"--recipe must be 'paper', got {recipe!r}")
        run_step_benchmark(
            json_path=json_path, quick=quick, preset=preset, device=device, recipe=recipe == "paper"
        )


@bench_app.command("kernel")
def bench_kernel(
    json_path: Path | None = json_option("kernel.json"),
    quick: bool = quick_option(
        "Fewer repeats and smaller CPU shapes: about a minute on a 2-core machine."
    ),
    dim: int = typer.Option(1024, "--dim", min=16, help="Embedding width D (1024 = ViT-L)."),
) -> None:
    """Patch embedding forward and forward+backward at the pretraining (B=8, 57 kept) and finetuning (B=64) shapes.

    On a GPU: Triton kernel vs sample_frames + RGB Conv3d (bf16 autocast). Without one: the channel-folded torch reference vs the RGB path (Triton is not timed; the report says so).
    """
    import torch

    from vctmae.bench.kernel import run_kernel_benchmark

    if not torch.cuda.is_available():
        typer.echo(
            "no GPU present: timing the folded torch reference against the torch RGB path (Triton not timed)"
        )
    run_kernel_benchmark(json_path=json_path, quick=quick, dim=dim)


@bench_app.command("predict")
def bench_predict(
    json_path: Path = typer.Option(
        None,
        "--json",
        help="Where to write the JSON report (default benchmarks/results/predict.json, "
        "predict-clinical.json with --clinical).",
    ),
    quick: bool = quick_option("Two small phantoms: a few minutes."),
    scans: int = typer.Option(None, "--scans", help="Scans timed (default 6, quick 2)."),
    clinical: bool = typer.Option(
        False, "--clinical", help="Clinical-size phantoms (512 x 512 x ~330 voxels)."
    ),
    preset: str = typer.Option("tiny", "--preset", help="Model preset (random weights)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
) -> None:
    """Seconds per scan of vctmae predict (crops in memory, model, attention, report) against the sequential fp32 predict, ingest + eval of the same scans and the model's forward passes alone; a fresh process's first scan; bf16 vs fp32 probabilities."""
    from vctmae.bench.predict import PredictBenchConfig, quick_config, run_predict_bench

    with expected_failures():
        changes = {"clinical": clinical, "preset": preset, "device": device}
        if scans is not None:
            changes["scans"] = scans
        config = quick_config(**changes) if quick else PredictBenchConfig(**changes)
        run_predict_bench(config, json_path=json_path)
