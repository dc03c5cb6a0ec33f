"""`vctmae predict`: its options are `PredictConfig`'s flagged fields (declared there once)."""

from __future__ import annotations

import typer

from vctmae.cli.app import app, expected_failures
from vctmae.cli.options import config_command
from vctmae.predict.config import PredictConfig


@config_command(app, PredictConfig)
def predict(config: PredictConfig) -> None:
    """Diagnose scans: per-vertebra fracture probabilities and an HTML report, from a CT (NIfTI or a DICOM series) and its vertebra label map."""
    from vctmae.outlock import hold_output
    from vctmae.predict.dicom_out import not_written_line
    from vctmae.predict.report import SUMMARY
    from vctmae.predict.run import run_predict

    def interrupted() -> str:
        # An earlier run's report is refused or removed before the first scan: a summary here
        # is this run's.
        if (config.out / SUMMARY).is_file():
            return (
                f"predict stopped; the report under {config.out} covers the scans finished so "
                "far (the same command with --resume continues it)"
            )
        return "predict stopped before its first scan was done; no report was written"

    with expected_failures(interrupted=interrupted), hold_output(config.out, "predict"):
        result = run_predict(config)
    ok = len(result.scans) - len(result.failed)
    typer.echo(
        f"{ok}/{len(result.scans)} scans ok, {result.vertebrae} vertebrae assessed, fracture "
        f"suspected at {result.fractured} (threshold {result.threshold.value:.4f}, "
        f"{result.threshold.source}) → {result.out / 'index.html'}",
        err=True,
    )
    if config.dicom_out:
        line = not_written_line(result.scans)
        if line:
            typer.echo(f"note: --dicom-out: {line}", err=True)
    if result.failed:
        typer.secho(
            f"error: {len(result.failed)} scan(s) failed; see {result.out / 'summary.json'}",
            fg="red",
            err=True,
        )
        raise typer.Exit(1)
