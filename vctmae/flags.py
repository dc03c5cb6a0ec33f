"""Command-line flags declared once, on the config field they set.

A config dataclass field made with `flag(default, "help")` is an option of every
command built from that config (`vctmae.cli.options`): its flag name, help text
and default live here, next to the field, and nowhere else. Fields made with a
plain `dataclasses.field` (or none) are Python-only settings, e.g. model overrides
for tests. This module imports nothing from vctmae but its errors, so configs of every
stage can use it without depending on the command line.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vctmae.errors import UsageError

FLAG = "vctmae.flag"


@dataclass(frozen=True, kw_only=True)
class Flag:
    """How a config field appears on the command line."""

    help: str
    # The flag, e.g. "--workers"; default: "--" + the field name with "_" → "-".
    name: str | None = None
    # A boolean with an explicit off switch, e.g. "--progress/--no-progress".
    negatable: bool = False
    # Several values after one flag (`--shards a.tar b.tar`, what a shell makes of a glob).
    many: bool = False
    # May differ when a run is resumed: it changes how fast or how verbosely the run goes, never
    # what it computes (data order, schedule, model). `--resume` refuses changes to the others.
    resumable: bool = False

    def option(self, field_name: str) -> str:
        return self.name or "--" + field_name.replace("_", "-")


def flag(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    name: str | None = None,
    negatable: bool = False,
    many: bool = False,
    resumable: bool = False,
) -> Any:
    """A dataclass field with a command-line flag (`default` omitted: a required option)."""
    metadata = {
        FLAG: Flag(help=help, name=name, negatable=negatable, many=many, resumable=resumable)
    }
    if isinstance(default, list | dict | set):
        raise TypeError("use an immutable default (a tuple) for a flag field")
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True, kw_only=True)
class ConfigField:
    """A leaf field of a (nested) config: where it is, and its flag if it has one."""

    # Field names from the outer config down, e.g. ("run", "loader", "workers").
    path: tuple[str, ...]
    hint: Any  # the field's resolved type
    flag: Flag | None

    @property
    def name(self) -> str:
        """The flag (e.g. "--workers"), or the dotted path of a field without one."""
        return self.flag.option(self.path[-1]) if self.flag else ".".join(self.path)

    def value(self, config: Any) -> Any:
        for step in self.path:
            config = getattr(config, step)
        return config


def is_config(hint: Any) -> bool:
    """Whether a field's type is itself a config dataclass (its fields are nested options)."""
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def config_fields(config: type, path: tuple[str, ...] = ()) -> Iterator[ConfigField]:
    """Every leaf field of `config` and of the config dataclasses nested in it, in field order."""
    hints = typing.get_type_hints(config)
    for field in dataclasses.fields(config):
        here = (*path, field.name)
        if is_config(hints[field.name]):
            yield from config_fields(hints[field.name], here)
        else:
            # The field's `Flag`, or None when it has no command-line flag.
            flag = field.metadata.get(FLAG)
            yield ConfigField(path=here, hint=hints[field.name], flag=flag)


def refuse_changed_settings(
    saved: dict[str, Any], current: dict[str, Any], *, where: Any, why: str
) -> None:
    """`--resume` of the run recorded at `where`: refuse, naming each setting that differs from
    the recorded one (`why`: what such a change does, and what to do instead)."""
    changed = [
        name for name in sorted(set(saved) | set(current)) if saved.get(name) != current.get(name)
    ]
    if changed:
        details = ", ".join(
            f"{name} {saved.get(name)!r} → {current.get(name)!r}" for name in changed
        )
        raise UsageError(f"{where}: --resume with changed settings ({details}); {why}")
