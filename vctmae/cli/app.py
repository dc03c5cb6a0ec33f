"""The typer application objects every command module registers itself on, and the one way
commands report expected failures."""

import contextlib
from collections.abc import Callable, Iterator

import typer

app = typer.Typer(
    name="vctmae",
    help="Video-CT MAE: spine CT scans → vertebra crops → video ViT MAE → fracture diagnosis.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

bench_app = typer.Typer(
    help="Benchmarks: each prints a table and writes JSON under benchmarks/results/.",
    no_args_is_help=True,
)
app.add_typer(bench_app, name="bench")


@contextlib.contextmanager
def expected_failures(interrupted: str | Callable[[], str] | None = None) -> Iterator[None]:
    """Turn an expected failure (`vctmae.errors.VctmaeError`) into one red line and its exit code.

    Everything else propagates with its traceback: a bug, an out-of-memory or a
    NCCL failure must show where it happened. `interrupted` is what Ctrl-C
    prints (what was kept, how to resume), or a function that tells it at that moment; it then
    exits 130.
    """
    from vctmae.errors import VctmaeError

    try:
        yield
    except VctmaeError as error:
        typer.secho(f"error: {error}", fg="red", err=True)
        raise typer.Exit(error.exit_code) from None
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        said = interrupted() if callable(interrupted) else interrupted
        typer.secho(f"interrupted: {said}", fg="yellow", err=True)
        raise typer.Exit(130) from None
