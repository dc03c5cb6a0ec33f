"""`vctmae bench kernel`: the fused Triton patch embedding vs the torch RGB Conv3d path."""

from __future__ import annotations

from pathlib import Path

import typer

from vctmae.cli.app import bench_app


@bench_app.command("kernel")
def bench_kernel(
    json_path: Path = typer.Option(
        None,
        "--json",
        help="Where to write the JSON report (default benchmarks/results/kernel.json).",
    ),
    quick: bool = typer.Option(
        False,
        "--quick",
        help="Fewer repeats and smaller CPU shapes: about a minute on a 2-core machine.",
    ),
    dim: int = typer.Option(1024, "--dim", min=16, help="Embedding width D (1024 = ViT-L)."),
) -> None:
    """Patch embedding forward and forward+backward at the pretraining (B=8, 57 kept) and finetuning (B=64) shapes.

    On a GPU: Triton kernel vs sample_frames + RGB Conv3d (bf16 autocast). Without one: the channel-folded torch reference vs the RGB path (Triton is not timed; the report says so).
    """
    import torch

    from vctmae.kernels.bench import run_kernel_benchmark

    if not torch.cuda.is_available():
        typer.echo(
            "no GPU present: timing the folded torch reference against the torch RGB path (Triton not timed)"
        )
    run_kernel_benchmark(json_path=json_path, quick=quick, dim=dim)
