"""Commands of the training stage: pretrain, finetune, eval, explain, demo.

The options of pretrain, finetune, eval and explain are the flagged fields of
their configs (`vctmae.train.config`, `vctmae.infer.config`), declared there once; `config_command`
derives each command from its config, and the functions here only run the
entry point and report. Heavy imports happen inside the functions.
"""

from __future__ import annotations

from pathlib import Path

import typer

from vctmae.cli.app import app, expected_failures
from vctmae.cli.options import config_command
from vctmae.infer.config import EvalConfig, ExplainConfig
from vctmae.train.config import FinetuneConfig, PretrainConfig


def _kept(out: Path, kind: str, command: str) -> str:
    """What Ctrl-C in a training command keeps, and how to continue."""
    from vctmae.train.checkpoint import checkpoint_folder

    return (
        f"{command} stopped; the checkpoints of completed epochs are kept in "
        f"{checkpoint_folder(out, kind)} — run the same command with --resume to continue"
    )


@config_command(app, PretrainConfig, defaults={"--out": Path("runs/pretrain")})
def pretrain(config: PretrainConfig) -> None:
    """MAE pretraining of the video ViT on vertebra crops (paper defaults)."""
    from vctmae.train.pretrain import run_pretrain

    with expected_failures(interrupted=_kept(config.run.out, "pretrain", "pretraining")):
        result = run_pretrain(config)
    typer.echo(f"pretraining done: {result.state.epoch} epochs, weights {result.model_path}")


@config_command(app, FinetuneConfig, defaults={"--out": Path("runs/finetune")})
def finetune(config: FinetuneConfig) -> None:
    """Finetune the fracture classifier (class-weighted CE, best checkpoint by validation F1)."""
    from vctmae.train.finetune import run_finetune

    with expected_failures(interrupted=_kept(config.run.out, "finetune", "finetuning")):
        result = run_finetune(config)
    best = result.state.best_metric
    note = (
        f", best validation F1 {best:.4f} (epoch {result.state.best_epoch})"
        if best is not None
        else ""
    )
    typer.echo(f"finetuning done: {result.state.epoch} epochs{note}; weights {result.best_path}")


@config_command(app, EvalConfig, name="eval")
def evaluate(config: EvalConfig) -> None:
    """Evaluate a classifier: one prediction per crop, F1/ACC/AUC/AP, plots."""
    from vctmae.infer.evaluate import run_eval
    from vctmae.outlock import hold_output

    interrupted = f"evaluation stopped; nothing was written to {config.out}"
    with expected_failures(interrupted=interrupted), hold_output(config.out, "eval"):
        run_eval(config)
    typer.echo(f"wrote {config.out / 'predictions.csv'} and {config.out / 'metrics.json'}")


@config_command(app, ExplainConfig)
def explain(config: ExplainConfig) -> None:
    """Attention (last layer and rollout) of the classifier over the 16 frames of one crop."""
    from vctmae.infer.explain import run_explain

    with expected_failures(interrupted=f"explain stopped; {config.out} was not written"):
        result = run_explain(config)
    typer.echo(f"{config.key}: P(fracture) = {result['prob_multiview']:.3f}; wrote {config.out}")


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
