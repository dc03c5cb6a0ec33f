"""`vctmae synth`: write synthetic spine CT phantoms (SPEC §3)."""

from pathlib import Path

import typer

from vctmae.cli.app import app


@app.command()
def synth(
    out: Path = typer.Option(..., "--out", help="Folder to write ct/, seg/ and labels.csv into."),
    cases: int = typer.Option(24, "--cases", help="Number of CT cases to write (at least 1)."),
    seed: int = typer.Option(
        0, "--seed", help="Random seed; the same seed writes byte-identical files."
    ),
    fracture_rate: float = typer.Option(
        0.25, "--fracture-rate", help="Probability that an inner vertebra is fractured (0–1)."
    ),
) -> None:
    """Write synthetic spine CT phantoms with VerSe label maps and fracture grades."""
    if cases < 1:
        typer.echo(f"error: --cases must be at least 1, got {cases}", err=True)
        raise typer.Exit(2)
    if seed < 0:
        typer.echo(f"error: --seed must be non-negative, got {seed}", err=True)
        raise typer.Exit(2)
    if not 0.0 <= fracture_rate <= 1.0:
        typer.echo(f"error: --fracture-rate must lie in [0, 1], got {fracture_rate}", err=True)
        raise typer.Exit(2)
    if out.exists() and not out.is_dir():
        typer.echo(f"error: {out}: exists and is not a folder", err=True)
        raise typer.Exit(2)

    from rich.progress import Progress

    from vctmae.ingest.synth import write_phantoms

    with Progress(transient=False) as progress:
        task = progress.add_task("synth", total=cases)
        try:
            labels = write_phantoms(
                out,
                cases=cases,
                seed=seed,
                fracture_rate=fracture_rate,
                progress=lambda case: progress.update(task, advance=1, description=case),
            )
        except (FileExistsError, OSError) as error:
            progress.stop()
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(1) from None
    typer.echo(f"wrote {cases} cases under {out} (labels: {labels})")
