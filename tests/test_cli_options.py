"""Commands built from config dataclasses (vctmae.cli.options): one declaration per option."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from vctmae.cli.options import config_command, config_options
from vctmae.flags import flag


@dataclass(frozen=True, kw_only=True)
class Inner:
    workers: int = flag(2, "Worker processes.")
    backend: str = flag("torch", "Backend: torch | dali.", name="--loader")
    secret: int = 7  # no flag: Python-only


@dataclass(frozen=True, kw_only=True)
class Outer:
    shards: tuple[str, ...] = flag(help="Shard paths.", many=True)
    out: Path = flag(Path("runs/a"), "Run folder.")
    clip: float | None = flag(None, "Clip the gradient norm.")
    progress: bool = flag(True, "Show progress.", negatable=True)
    mirror: bool = flag(False, "Mirror augmentation.")
    inner: Inner = field(default_factory=Inner)
    overrides: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.inner.workers < 0:
            raise ValueError("workers must be >= 0")


def make_app(seen: list) -> typer.Typer:
    app = typer.Typer()

    @config_command(app, Outer)
    def go(config: Outer) -> None:
        """Do it."""
        seen.append(config)

    @config_command(app, Outer, name="other", defaults={"--out": Path("runs/b")})
    def other(config: Outer) -> None:
        """Other defaults."""
        seen.append(config)

    return app


def test_flags_defaults_and_nesting():
    seen: list[Outer] = []
    result = CliRunner().invoke(
        make_app(seen), ["go", "--shards", "a.tar", "b.tar", "--workers", "0"]
    )
    assert result.exit_code == 0, result.output
    [config] = seen
    assert config == Outer(shards=("a.tar", "b.tar"), inner=Inner(workers=0))
    assert isinstance(config.shards, tuple) and config.inner.secret == 7


def test_flags_of_every_field_kind_reach_the_config():
    seen: list[Outer] = []
    args = ["other", "--shards", "x.tar", "--no-progress", "--mirror", "--clip", "0.5"]
    result = CliRunner().invoke(make_app(seen), [*args, "--loader", "dali", "--out", "o"])
    assert result.exit_code == 0, result.output
    [config] = seen
    assert (config.progress, config.mirror, config.clip) == (False, True, 0.5)
    assert (config.inner.backend, config.out) == ("dali", Path("o"))


def test_per_command_override_and_help():
    seen: list[Outer] = []
    app = make_app(seen)
    assert CliRunner().invoke(app, ["other", "--shards", "x"]).exit_code == 0
    assert CliRunner().invoke(app, ["go", "--shards", "x"]).exit_code == 0
    assert [c.out for c in seen] == [Path("runs/b"), Path("runs/a")]
    text = CliRunner().invoke(app, ["other", "--help"], terminal_width=200).output
    assert "runs/b" in text and "Worker processes." in text and "--no-progress" in text
    assert "Other defaults." in text
    assert "--secret" not in text and "--overrides" not in text


def test_required_option_and_validation_reach_the_user():
    seen: list[Outer] = []
    app = make_app(seen)
    missing = CliRunner().invoke(app, ["go"])
    assert missing.exit_code == 2 and "--shards" in missing.output
    with pytest.raises(ValueError, match="workers must be"):
        CliRunner().invoke(app, ["go", "--shards", "x", "--workers", "-1"], catch_exceptions=False)
    assert not seen


def test_option_paths_follow_the_nesting():
    paths = {o.name: o.path for o in config_options(Outer)}
    assert paths["--loader"] == ("inner", "backend")
    assert paths["--workers"] == ("inner", "workers")
    assert "--overrides" not in paths and len(paths) == 7
    assert dataclasses.fields(Outer)  # a plain dataclass: nothing generated on the class itself


@dataclass(frozen=True, kw_only=True)
class Sized:
    # The command line passes the text; the config parses it (as "1k" → 1024 here).
    size: int | str = flag("1k", "A size.")
    names: frozenset[str] | str | None = flag(None, "Comma-separated names.")

    def __post_init__(self) -> None:
        if isinstance(self.size, str):
            object.__setattr__(self, "size", int(self.size.removesuffix("k")) * 1024)
        if isinstance(self.names, str):
            object.__setattr__(self, "names", frozenset(self.names.split(",")))


def test_a_field_that_admits_text_is_read_as_text_and_parsed_by_its_config():
    seen: list[Sized] = []
    app = typer.Typer()

    @config_command(app, Sized)
    def go(config: Sized) -> None:
        """Go."""
        seen.append(config)

    @app.command()
    def other() -> None:
        """A second command, so that `go` is invoked by name."""

    runner = CliRunner()
    assert runner.invoke(app, ["go", "--size", "3k", "--names", "a,b"]).exit_code == 0
    assert runner.invoke(app, ["go"]).exit_code == 0
    assert seen == [Sized(size=3072, names=frozenset({"a", "b"})), Sized(size=1024)]
    text = runner.invoke(app, ["go", "--help"], terminal_width=200).output
    assert "[default: 1k]" in text
