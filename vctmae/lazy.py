"""Package exports that load their module on first use (PEP 562).

`vctmae.data` and `vctmae.train` re-export names from their modules this way,
so the command line can import a package's small config modules (to build its
options) without importing torch; the first use of e.g. `vctmae.data.ShardLoader`
imports `vctmae.data.loader` then.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], list[str]]:
    """(`__getattr__`, `__all__`) for `package`, whose name X lives in module `exports[X]`: a
    submodule of `package`, or a module named in full (`vctmae.clip`) whose name it re-exports."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = exports[name]
        full = module if module.startswith("vctmae.") else f"{package}.{module}"
        return getattr(importlib.import_module(full), name)

    return __getattr__, sorted(exports)
