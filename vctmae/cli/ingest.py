"""`vctmae ingest`: its options are `IngestConfig`'s flagged fields (declared there once)."""

from __future__ import annotations

import typer

from vctmae.cli.app import app, expected_failures
from vctmae.cli.options import config_command
from vctmae.clip import NUM_FRAMES, STRIDE
from vctmae.errors import UsageError
from vctmae.ingest.config import MIN_TRAINING_SIZE, IngestConfig

INTERRUPTED = "finished cases are kept; run the same command again to resume"


@config_command(app, IngestConfig)
def ingest(config: IngestConfig) -> None:
    """Cut raw spine CTs into int16 vertebra crops: WebDataset shards + Zarr store + manifest."""
    with expected_failures(interrupted=INTERRUPTED):
        from vctmae.ingest import pipeline

        # Python callers may cut smaller crops (tests do); the command line writes crops the
        # training frame rule can sample.
        size = config.geometry.size
        if size < MIN_TRAINING_SIZE:
            raise UsageError(
                f"--size {size} is too small to train on: the model samples {NUM_FRAMES} sagittal "
                f"frames {STRIDE} slices apart, which needs crops of at least {MIN_TRAINING_SIZE} "
                "voxels"
            )
        for path, what in (
            (config.src, "--src"),
            (config.labels, "--labels"),
            (config.pairs, "--pairs"),
        ):
            if path is not None and not path.exists():
                raise UsageError(f"{path}: {what} does not exist")
        report = pipeline.run_ingest(config)
    out = config.out
    summary = (
        f"{report['cases_ok']}/{report['cases_seen']} cases ok, {report['vertebrae_written']} vertebrae "
        f"written, {report['vertebrae_skipped']} skipped → {out}"
    )
    typer.echo(summary, err=True)
    if report["splits"]:
        typer.echo(
            "  "
            + ", ".join(
                f"{split}: {s['vertebrae']} vertebrae / {s['patients']} patients"
                for split, s in report["splits"].items()
            ),
            err=True,
        )
    if report["cases_failed"]:
        typer.echo(
            f"error: {report['cases_failed']} case(s) failed; see {out / 'ingest-report.json'}",
            err=True,
        )
        raise typer.Exit(1)
