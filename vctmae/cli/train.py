"""Commands of the training stage: pretrain, finetune, eval, explain, demo.

Each command parses flags into a config and calls one entry point of
`vctmae.train` (or `vctmae.demo`); heavy imports happen inside the functions.
"""

from __future__ import annotations

from pathlib import Path

import typer
from typer.core import TyperCommand

from vctmae.cli.app import app, expected_failures


class ManyValuesCommand(TyperCommand):
    """Lets `--shards a.tar b.tar c.tar` (what a shell makes of an unquoted glob) mean three values.

    Values after a many-valued flag, up to the next option, are rewritten into
    repeated flags before typer parses them.
    """

    many = ("--shards", "--val-shards")

    def parse_args(self, ctx, args: list[str]) -> list[str]:  # type: ignore[no-untyped-def]
        rewritten: list[str] = []
        current: str | None = None
        for arg in args:
            if arg.startswith("-"):
                current = arg if arg in self.many else None
                rewritten.append(arg)
            elif current is not None and rewritten[-1] != current:
                rewritten.extend([current, arg])
            else:
                rewritten.append(arg)
        return super().parse_args(ctx, rewritten)


def _kept(out: Path, command: str) -> str:
    """What Ctrl-C in a training command keeps, and how to continue."""
    return (
        f"{command} stopped; the checkpoints of completed epochs are kept in "
        f"{out / 'checkpoints'} — run the same command with --resume to continue"
    )


SHARDS_HELP = (
    "WebDataset shards: paths (an unquoted glob's many paths), a quoted glob or a brace pattern."
)
DEVICE_HELP = (
    "auto (GPU when present), cpu or cuda; under torchrun each process takes its LOCAL_RANK GPU."
)


@app.command(cls=ManyValuesCommand)
def pretrain(
    shards: list[str] = typer.Option(..., "--shards", help=SHARDS_HELP),
    init: Path | None = typer.Option(
        None, "--init", help="mae_st / PySlowFast video checkpoint (.pth) to start from."
    ),
    pos_init: str = typer.Option(
        "crop", "--pos-init", help="Positional embeddings from --init: crop | random | interpolate."
    ),
    model: str = typer.Option(
        "large", "--model", help="Model preset: large | base | small | tiny."
    ),
    epochs: int = typer.Option(100, "--epochs", help="Training epochs."),
    batch_size: int = typer.Option(8, "--batch-size", help="Crops per step per process."),
    accum_steps: int = typer.Option(1, "--accum-steps", help="Micro-batches per optimizer step."),
    blr: float = typer.Option(
        1e-3, "--blr", help="Base lr; lr = blr × batch × processes × accum / 256."
    ),
    min_lr: float = typer.Option(0.0, "--min-lr", help="Final lr of the cosine schedule."),
    warmup_epochs: int = typer.Option(
        40, "--warmup-epochs", help="Linear warmup epochs (per-iteration schedule)."
    ),
    weight_decay: float = typer.Option(
        0.05, "--weight-decay", help="AdamW weight decay (not on norms, biases, embeddings)."
    ),
    mask_ratio: float = typer.Option(0.8, "--mask-ratio", help="Fraction of tubes masked."),
    grad_clip: float | None = typer.Option(
        None, "--grad-clip", help="Clip the gradient norm to this value."
    ),
    mirror: bool = typer.Option(False, "--mirror", help="Random left–right mirror augmentation."),
    seed: int = typer.Option(0, "--seed", help="Seed of data order, offsets and masks."),
    workers: int = typer.Option(
        2, "--workers", help="Loader worker processes per training process."
    ),
    loader: str = typer.Option("torch", "--loader", help="Loader backend: torch | dali."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model."),
    patch_embed: str = typer.Option(
        "auto", "--patch-embed", help="Patch embedding: auto | torch | triton."
    ),
    log_every: int = typer.Option(20, "--log-every", help="Optimizer steps between log records."),
    out: Path = typer.Option(
        Path("runs/pretrain"),
        "--out",
        help="Run folder: checkpoints, model.safetensors, log, previews.",
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue from the last checkpoint in --out."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
) -> None:
    """MAE pretraining of the video ViT on vertebra crops (paper defaults)."""
    from vctmae.train import PretrainConfig, run_pretrain

    with expected_failures(interrupted=_kept(out, "pretraining")):
        config = PretrainConfig(
            shards=tuple(shards), init=init, pos_init=pos_init, model=model, epochs=epochs,
            batch_size=batch_size, accum_steps=accum_steps, blr=blr, min_lr=min_lr,
            warmup_epochs=warmup_epochs, weight_decay=weight_decay, mask_ratio=mask_ratio,
            grad_clip=grad_clip, mirror=mirror, seed=seed, num_workers=workers, loader=loader,
            device=device, compile=compile, patch_embed=patch_embed, log_every=log_every,
            out=out, resume=resume, progress=progress,
        )  # fmt: skip
        result = run_pretrain(config)
    typer.echo(f"pretraining done: {result.state.epoch} epochs, weights {result.model_path}")


@app.command(cls=ManyValuesCommand)
def finetune(
    shards: list[str] = typer.Option(..., "--shards", help=SHARDS_HELP + " (training split)"),
    val_shards: list[str] = typer.Option(
        [], "--val-shards", help="Validation shards (validated every epoch)."
    ),
    init: Path | None = typer.Option(
        None, "--init", help="Pretraining .safetensors, a video .pth, or omit for random."
    ),
    pos_init: str = typer.Option(
        "crop", "--pos-init", help="Positional embeddings from a .pth: crop | random | interpolate."
    ),
    model: str = typer.Option(
        "large", "--model", help="Model preset: large | base | small | tiny."
    ),
    epochs: int = typer.Option(50, "--epochs", help="Training epochs."),
    batch_size: int = typer.Option(64, "--batch-size", help="Crops per step per process."),
    accum_steps: int = typer.Option(1, "--accum-steps", help="Micro-batches per optimizer step."),
    lr: float = typer.Option(1e-5, "--lr", help="Peak learning rate (Adam)."),
    warmup_epochs: int = typer.Option(5, "--warmup-epochs", help="Warmup epochs from --warmup-lr."),
    warmup_lr: float = typer.Option(1e-8, "--warmup-lr", help="Learning rate at step 0."),
    min_lr: float = typer.Option(1e-7, "--min-lr", help="Final lr of the cosine schedule."),
    class_weights: str = typer.Option(
        "inverse",
        "--class-weights",
        help="inverse (class frequency of the training shards' labels) | none.",
    ),
    multiview: int = typer.Option(6, "--multiview", help="Views per crop in validation: 6 or 1."),
    patience: int = typer.Option(
        40, "--patience", help="Stop after this many epochs without a better validation F1."
    ),
    dropout: float | None = typer.Option(
        None, "--dropout", help="Head dropout (default: the model preset's)."
    ),
    grad_clip: float | None = typer.Option(
        None, "--grad-clip", help="Clip the gradient norm to this value."
    ),
    mirror: bool = typer.Option(False, "--mirror", help="Random left–right mirror augmentation."),
    seed: int = typer.Option(0, "--seed", help="Seed of data order and offsets."),
    workers: int = typer.Option(
        2, "--workers", help="Loader worker processes per training process."
    ),
    loader: str = typer.Option("torch", "--loader", help="Loader backend: torch | dali."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model."),
    patch_embed: str = typer.Option(
        "auto", "--patch-embed", help="Patch embedding: auto | torch | triton."
    ),
    log_every: int = typer.Option(20, "--log-every", help="Optimizer steps between log records."),
    out: Path = typer.Option(
        Path("runs/finetune"), "--out", help="Run folder: checkpoints, best.safetensors, log."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue from the last checkpoint in --out."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
) -> None:
    """Finetune the fracture classifier (class-weighted CE, best checkpoint by validation F1)."""
    from vctmae.train import FinetuneConfig, run_finetune

    with expected_failures(interrupted=_kept(out, "finetuning")):
        config = FinetuneConfig(
            shards=tuple(shards), val_shards=tuple(val_shards), init=init, pos_init=pos_init,
            model=model, epochs=epochs, batch_size=batch_size, accum_steps=accum_steps, lr=lr,
            warmup_epochs=warmup_epochs, warmup_start_lr=warmup_lr, min_lr=min_lr,
            class_weights=class_weights, multiview=multiview, patience=patience, dropout=dropout,
            grad_clip=grad_clip, mirror=mirror, seed=seed, num_workers=workers, loader=loader,
            device=device, compile=compile, patch_embed=patch_embed, log_every=log_every,
            out=out, resume=resume, progress=progress,
        )  # fmt: skip
        result = run_finetune(config)
    best = result.state.best_metric
    note = (
        f", best validation F1 {best:.4f} (epoch {result.state.best_epoch})"
        if best is not None
        else ""
    )
    typer.echo(f"finetuning done: {result.state.epoch} epochs{note}; weights {result.best_path}")


@app.command(name="eval", cls=ManyValuesCommand)
def evaluate(
    checkpoint: Path = typer.Option(
        ..., "--checkpoint", help="Classifier weights (.safetensors from finetune)."
    ),
    shards: list[str] = typer.Option(..., "--shards", help=SHARDS_HELP),
    multiview: int = typer.Option(
        6, "--multiview", help="Views per crop: 6 (all offsets) or 1 (the middle one)."
    ),
    batch_size: int = typer.Option(64, "--batch-size", help="Crops per forward pass per process."),
    workers: int = typer.Option(2, "--workers", help="Loader worker processes per process."),
    loader: str = typer.Option("torch", "--loader", help="Loader backend: torch | dali."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    patch_embed: str = typer.Option(
        "auto", "--patch-embed", help="Patch embedding: auto | torch | triton."
    ),
    out: Path = typer.Option(
        Path("report"), "--out", help="Folder for predictions.csv, metrics.json, roc.png, pr.png."
    ),
) -> None:
    """Evaluate a classifier: one prediction per crop, F1/ACC/AUC/AP, plots."""
    from vctmae.train import EvalConfig, run_eval

    with expected_failures(interrupted=f"evaluation stopped; nothing was written to {out}"):
        config = EvalConfig(
            checkpoint=checkpoint, shards=tuple(shards), multiview=multiview, batch_size=batch_size,
            num_workers=workers, loader=loader, device=device, patch_embed=patch_embed, out=out,
        )  # fmt: skip
        run_eval(config)
    typer.echo(f"wrote {out / 'predictions.csv'} and {out / 'metrics.json'}")


@app.command()
def explain(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Classifier weights (.safetensors)."),
    zarr: Path = typer.Option(..., "--zarr", help="Zarr store written by ingest (crops.zarr)."),
    key: str = typer.Option(..., "--key", help="Crop key, e.g. case-0003_L1 (see manifest.csv)."),
    out: Path = typer.Option(Path("explain.png"), "--out", help="PNG to write."),
    offset: int = typer.Option(3, "--offset", help="Which of the six views (0–5) to draw."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
) -> None:
    """Attention (last layer and rollout) of the classifier over the 16 frames of one crop."""
    from vctmae.train import ExplainConfig, run_explain

    with expected_failures(interrupted=f"explain stopped; {out} was not written"):
        result = run_explain(
            ExplainConfig(
                checkpoint=checkpoint, zarr=zarr, key=key, out=out, offset=offset, device=device
            )
        )
    typer.echo(f"{key}: P(fracture) = {result['prob_multiview']:.3f}; wrote {out}")


@app.command()
def demo(
    out: Path = typer.Option(Path("demo"), "--out", help="Folder for every stage's output."),
    quick: bool = typer.Option(False, "--quick", help="A smaller, faster configuration (for CI)."),
    cases: int | None = typer.Option(
        None, "--cases", help="Synthetic cases (default: the preset's)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of phantoms and training."),
) -> None:
    """Whole pipeline on synthetic phantoms, CPU, tiny model: synth → ingest → pretrain → finetune → eval → explain."""
    from vctmae.demo import DemoConfig, run_demo

    with expected_failures(interrupted=f"demo stopped; the stages done so far are under {out}"):
        config = DemoConfig.quick(out=out, seed=seed) if quick else DemoConfig(out=out, seed=seed)
        if cases is not None:
            import dataclasses

            config = dataclasses.replace(config, cases=cases)
        run_demo(config)
