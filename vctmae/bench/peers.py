"""The peers `vctmae bench` measures against, loaded from the repository checkout.

A peer is another library's way of doing what vctmae does (the paper code's
MONAI data path, a MONAI user's crop recipe). Their set-ups live in
`benchmarks/peers/` beside the package, not in it, and need the `bench` extra
(`pip install 'vctmae[bench]'`); without either the benchmark stops with one line.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path
from types import ModuleType

from vctmae.errors import VctmaeError

PEERS = Path(__file__).resolve().parents[2] / "benchmarks" / "peers"


def load_peer(name: str, folder: Path | None = None) -> ModuleType:
    """The module `<name>.py` of `folder` (default: the checkout's `benchmarks/peers/`),
    imported once."""
    path = (folder or PEERS) / f"{name}.py"
    if not path.is_file():
        raise VctmaeError(
            f"{path}: not found; the benchmarks' peers live in the repository checkout "
            "(run vctmae bench from a clone of the repository)"
        )
    if importlib.util.find_spec("monai") is None:
        raise VctmaeError(
            f"{path}: needs MONAI, which is not installed: pip install 'vctmae[bench]'"
        )
    module_name = f"vctmae_peers.{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs, so that its classes can be found again by name (pickling).
    sys.modules[module_name] = module
    with warnings.catch_warnings():
        # MONAI's readers announce optional GPU decoders that are not installed.
        warnings.simplefilter("ignore", UserWarning)
        spec.loader.exec_module(module)
    return module


def monai_version() -> str:
    """The installed MONAI's version, for the reports."""
    from importlib.metadata import version

    return version("monai")
