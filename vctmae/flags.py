"""Command-line flags declared once, on the config field they set.

A config dataclass field made with `flag(default, "help")` is an option of every
command built from that config (`vctmae.cli.options`): its flag name, help text
and default live here, next to the field, and nowhere else. Fields made with a
plain `dataclasses.field` (or none) are Python-only settings, e.g. model overrides
for tests. This module imports nothing from vctmae, so configs of every stage
can use it without depending on the command line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

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

    def option(self, field_name: str) -> str:
        return self.name or "--" + field_name.replace("_", "-")


def flag(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    name: str | None = None,
    negatable: bool = False,
    many: bool = False,
) -> Any:
    """A dataclass field with a command-line flag (`default` omitted: a required option)."""
    metadata = {FLAG: Flag(help=help, name=name, negatable=negatable, many=many)}
    if isinstance(default, list | dict | set):
        raise TypeError("use an immutable default (a tuple) for a flag field")
    return dataclasses.field(default=default, metadata=metadata)


def field_flag(field: dataclasses.Field) -> Flag | None:
    """The `Flag` of a dataclass field, or None when it has no command-line flag."""
    return field.metadata.get(FLAG)
