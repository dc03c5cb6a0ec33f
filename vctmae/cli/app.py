"""The typer application objects every command module registers itself on."""

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
