"""Commands of the training stage: pretrain, finetune, eval, explain, demo.

The options of pretrain, finetune, eval and explain are the flagged fields of
their configs (`vctmae.train.config`), declared there once; `config_command`
derives each command from its config, and the functions here only run the
entry point and report. Heavy imports happen inside the functions.
"""

from __future__ import annotations

from pathlib import Path

import typer

from vctmae.cli.app import app, expected_failures
from vctmae.cli.options import config_command
from vctmae.train.config import (
    SHARDS_HELP,
    EvalConfig,
    ExplainConfig,
    FinetuneConfig,
    PretrainConfig,
)


def _kept(out: Path, command: str) -> str:
    """What Ctrl-C in a training command keeps, and how to continue."""
    return (
        f"{command} stopped; the checkpoints of completed epochs are kept in "
        f"{out / 'checkpoints'} — run the same command with --resume to continue"
    )


def pretrain(config: PretrainConfig) -> None:
    from vctmae.train import run_pretrain

    with expected_failures(interrupted=_kept(config.run.out, "pretraining")):
        result = run_pretrain(config)
    typer.echo(f"pretraining done: {result.state.epoch} epochs, weights {result.model_path}")


def finetune(config: FinetuneConfig) -> None:
    from vctmae.train import run_finetune

    with expected_failures(interrupted=_kept(config.run.out, "finetuning")):
        result = run_finetune(config)
    best = result.state.best_metric
    note = (
        f", best validation F1 {best:.4f} (epoch {result.state.best_epoch})"
        if best is not None
        else ""
    )
    typer.echo(f"finetuning done: {result.state.epoch} epochs{note}; weights {result.best_path}")


def evaluate(config: EvalConfig) -> None:
    from vctmae.train import run_eval

    with expected_failures(interrupted=f"evaluation stopped; nothing was written to {config.out}"):
        run_eval(config)
    typer.echo(f"wrote {config.out / 'predictions.csv'} and {config.out / 'metrics.json'}")


def explain(config: ExplainConfig) -> None:
    from vctmae.train import run_explain

    with expected_failures(interrupted=f"explain stopped; {config.out} was not written"):
        result = run_explain(config)
    typer.echo(f"{config.key}: P(fracture) = {result['prob_multiview']:.3f}; wrote {config.out}")


config_command(
    app,
    PretrainConfig,
    pretrain,
    name="pretrain",
    help="MAE pretraining of the video ViT on vertebra crops (paper defaults).",
    overrides={
        "--out": {
            "default": Path("runs/pretrain"),
            "help": "Run folder: checkpoints, model.safetensors, log, previews.",
        },
        "--init": {"help": "mae_st / PySlowFast video checkpoint (.pth) to start from."},
        "--pos-init": {"help": "Positional embeddings from --init: crop | random | interpolate."},
    },
)
config_command(
    app,
    FinetuneConfig,
    finetune,
    name="finetune",
    help="Finetune the fracture classifier (class-weighted CE, best checkpoint by validation F1).",
    overrides={
        "--shards": {"help": SHARDS_HELP + " (training split)"},
        "--out": {
            "default": Path("runs/finetune"),
            "help": "Run folder: checkpoints, best.safetensors, log.",
        },
        "--init": {"help": "Pretraining .safetensors, a video .pth, or omit for random."},
        "--seed": {"help": "Seed of data order and offsets."},
    },
)
config_command(
    app,
    EvalConfig,
    evaluate,
    name="eval",
    help="Evaluate a classifier: one prediction per crop, F1/ACC/AUC/AP, plots.",
    overrides={"--workers": {"help": "Loader worker processes per process."}},
)
config_command(
    app,
    ExplainConfig,
    explain,
    name="explain",
    help="Attention (last layer and rollout) of the classifier over the 16 frames of one crop.",
)


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
