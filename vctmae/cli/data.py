"""`vctmae bench loader`: the streaming loader against the paper code's per-sample NIfTI chain."""

from __future__ import annotations

from pathlib import Path

import typer

from vctmae.cli.app import bench_app


@bench_app.command("loader")
def bench_loader(
    json_path: Path = typer.Option(
        None,
        "--json",
        help="Where to write the JSON report (default benchmarks/results/loader.json).",
    ),
    quick: bool = typer.Option(
        False, "--quick", help="Fewer crops and repeats: about a minute on a 2-core machine."
    ),
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
    """Samples/s from shards to device-ready batches (torch 0/1/2 workers, DALI) vs the reference chain and the raw tar read."""
    from vctmae.data.bench import LoaderBenchConfig, quick_config, run_loader_bench

    overrides = {"batch_size": batch_size, "device": device, "dali": not no_dali}
    if samples is not None:
        overrides["samples"] = samples
    try:
        config = quick_config(**overrides) if quick else LoaderBenchConfig(**overrides)
    except ValueError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    run_loader_bench(config, json_path=json_path)
