"""Command line: parses flags and calls one entry point of a stage, nothing else.

Each stage's commands live in their own module and register on `app`;
heavy imports happen inside the command functions so `--help` stays fast.
"""

from vctmae.cli import bench, ingest, predict, synth, train  # noqa: F401  (registers commands)
from vctmae.cli.app import app


def main() -> None:
    app()
