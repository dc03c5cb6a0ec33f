"""Commands built from config dataclasses: each option declared once, on its config field.

`@config_command(app, Config)` on a function `run(config)` makes a typer command
whose options are the fields of `Config` declared with `vctmae.flags.flag` — nested config
dataclasses (e.g. a `RunOptions` inside a `PretrainConfig`, a `LoaderOptions`
inside that) contribute their flagged fields too. The command parses the flags,
builds the nested config (validated by its `__post_init__`) and calls `run`
with it. Defaults and help text come from the fields, so a default changed in
the config is the default on the command line, in `--help` and in Python.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

import typer
from typer.core import TyperCommand

from vctmae.cli.app import expected_failures
from vctmae.flags import ConfigField, config_fields, is_config


class ManyValuesCommand(TyperCommand):
    """Lets `--shards a.tar b.tar c.tar` (what a shell makes of an unquoted glob) mean three values.

    Values after a many-valued flag, up to the next option, are rewritten into
    repeated flags before typer parses them. Subclasses set `many`.
    """

    many: tuple[str, ...] = ()

    def parse_args(self, ctx, args: list[str]) -> list[str]:  # type: ignore[no-untyped-def]
        rewritten: list[str] = []
        current: str | None = None
        for arg in args:
            if arg.startswith("-"):
                current = arg if arg in self.many else None
                rewritten.append(arg)
            elif current is not None and rewritten[-1] != current:
                rewritten.extend([current, arg])
            else:
                rewritten.append(arg)
        return super().parse_args(ctx, rewritten)


def _cli_type(hint: Any) -> tuple[Any, bool]:
    """The type typer parses for a field type; True when the value must become a tuple again.

    A field whose type admits `str` among others (`frozenset[str] | str`, `int | str`) is read
    as text: its config parses the text in `__post_init__` (e.g. "T1-L6", "1GiB").
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return list[args[0]], True
    if origin in (typing.Union, types.UnionType) and str in args and len(args) > 1:
        return (str | None if type(None) in args else str), False
    return hint, False


def _own_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def leaf_default(config: type, path: tuple[str, ...]) -> Any:
    """The default of the field at `path`: from the nearest enclosing field that has a default
    (a nested config's default instance wins over its class's field defaults)."""
    value: Any = dataclasses.MISSING
    current = config
    for name in path:
        if value is not dataclasses.MISSING:
            value = getattr(value, name)
            continue
        field = {f.name: f for f in dataclasses.fields(current)}[name]
        value = _own_default(field)
        current = typing.get_type_hints(current)[name]
    return value


def config_options(config: type) -> list[ConfigField]:
    """Every flagged field of `config` and of the config dataclasses nested in it, in field order."""
    return [leaf for leaf in config_fields(config) if leaf.flag is not None]


def _param(option: ConfigField) -> str:
    """The command function's parameter for an option (unique per command): "--val-shards" →
    "val_shards"."""
    return option.name.removeprefix("--").replace("-", "_")


def build_config(config: type, values: Mapping[tuple[str, ...], Any], path: tuple[str, ...] = ()):
    """`config` from option values keyed by their path; unflagged fields keep their defaults."""
    hints = typing.get_type_hints(config)
    kwargs: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        here = (*path, field.name)
        if is_config(hints[field.name]):
            if any(key[: len(here)] == here for key in values):
                kwargs[field.name] = build_config(hints[field.name], values, here)
        elif here in values:
            kwargs[field.name] = values[here]
    return config(**kwargs)


def config_command(
    app: typer.Typer,
    config: type,
    *,
    name: str | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> Callable[[Callable[[Any], None]], Callable[..., None]]:
    """Decorate `run(config)` to register it on `app` as a command whose options are `config`'s
    flagged fields; the command's help is `run`'s docstring, its name `run`'s (or `name`).

    `defaults` maps a flag to this command's default where the config has none or another
    (e.g. each trainer's default `--out` folder).
    """
    options = config_options(config)
    defaults = defaults or {}
    unknown = set(defaults) - {o.name for o in options}
    if unknown:
        raise ValueError(f"{config.__name__}: defaults for unknown flags {sorted(unknown)}")

    def register(run: Callable[[Any], None]) -> Callable[..., None]:
        parameters = [_parameter(config, option, defaults) for option in options]

        def command(**values: Any) -> None:
            by_path = {}
            for option in options:
                value = values[_param(option)]
                as_tuple = _cli_type(option.hint)[1]
                by_path[option.path] = tuple(value) if as_tuple else value
            # A value the config refuses is one line and exit 2 (UsageError), like a bad flag.
            with expected_failures():
                built = build_config(config, by_path)
            run(built)

        command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in parameters}
        command.__doc__ = run.__doc__
        command.__name__ = run.__name__
        # A command class for which each many-valued flag takes several values.
        many = tuple(o.name for o in options if o.flag.many)
        command_class = type("ManyValues", (ManyValuesCommand,), {"many": many})
        app.command(name=name or run.__name__, cls=command_class)(command)
        return command

    return register


def _parameter(config: type, option: ConfigField, defaults: Mapping[str, Any]) -> inspect.Parameter:
    """The typer parameter of one option (with this command's default, if it has one); a
    tuple field is parsed as a list. A required option has no default."""
    annotation, as_tuple = _cli_type(option.hint)
    default = leaf_default(config, option.path)
    if as_tuple and default is not dataclasses.MISSING:
        default = list(default)
    default = defaults.get(option.name, default)
    names = option.name
    if option.flag.negatable:
        names = f"{option.name}/--no-{option.name.removeprefix('--')}"
    return inspect.Parameter(
        _param(option),
        inspect.Parameter.KEYWORD_ONLY,
        default=typer.Option(
            ... if default is dataclasses.MISSING else default,
            names,
            help=option.flag.help,
        ),
        annotation=annotation,
    )
