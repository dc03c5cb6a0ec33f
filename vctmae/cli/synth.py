"""`vctmae synth`: its options are `SynthConfig`'s flagged fields (declared there once)."""

import typer

from vctmae.cli.app import app, expected_failures
from vctmae.cli.options import config_command
from vctmae.synth import SynthConfig


@config_command(app, SynthConfig)
def synth(config: SynthConfig) -> None:
    """Write synthetic spine CT phantoms with VerSe label maps and fracture grades."""
    interrupted = (
        "the case files written so far are complete (labels.csv comes last); "
        "run the same command again to write them all"
    )
    with expected_failures(interrupted=interrupted):
        from rich.progress import Progress

        from vctmae.synth.phantoms import write_phantoms

        # write_phantoms checks the folder and the case count before it writes anything.
        with Progress(transient=False) as progress:
            task = progress.add_task("synth", total=config.cases)
            labels = write_phantoms(
                config, progress=lambda case: progress.update(task, advance=1, description=case)
            )
    typer.echo(f"wrote {config.cases} cases under {config.out} (labels: {labels})")
