"""`vctmae synth`: write synthetic spine CT phantoms (SPEC §3)."""

from pathlib import Path

import typer

from vctmae.cli.app import app, expected_failures


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
    clinical: bool = typer.Option(
        False,
        "--clinical",
        help="Clinical-size cases: 512 x 512 x ~330 voxels of ~0.7 x 0.7 x 1.1 mm, 12–14 vertebrae (~60 MB each), for benchmarks.",
    ),
) -> None:
    """Write synthetic spine CT phantoms with VerSe label maps and fracture grades."""
    interrupted = (
        "the case files written so far are complete (labels.csv comes last); "
        "run the same command again to write them all"
    )
    with expected_failures(interrupted=interrupted):
        from rich.progress import Progress

        from vctmae.synth import write_phantoms

        # write_phantoms checks every flag before it writes anything (UsageError: exit 2).
        with Progress(transient=False) as progress:
            task = progress.add_task("synth", total=cases)
            labels = write_phantoms(
                out,
                cases=cases,
                seed=seed,
                fracture_rate=fracture_rate,
                clinical=clinical,
                progress=lambda case: progress.update(task, advance=1, description=case),
            )
    typer.echo(f"wrote {cases} cases under {out} (labels: {labels})")
