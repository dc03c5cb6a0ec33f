"""vctmae.ingest: raw spine CT + vertebra label maps → int16 crops in shards and Zarr.

Entry point: `vctmae.ingest.pipeline.run_ingest(IngestConfig(...))`, the config in
`vctmae.ingest.config` (light at import: the command line builds its options from it).

The compiled loops (`sampling`, `label_pass`) are cached by numba on disk, by default beside
their source, which an installed package may not be allowed to write: this package points
numba's own setting, NUMBA_CACHE_DIR, at a per-user folder (`numba_cache_dir`) before they
are compiled, unless the user has set it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path


def numba_cache_dir(environ: Mapping[str, str]) -> Path:
    """Where numba caches the compiled loops: $NUMBA_CACHE_DIR when set, else
    $XDG_CACHE_HOME/vctmae/numba, else ~/.cache/vctmae/numba."""
    if environ.get("NUMBA_CACHE_DIR"):
        return Path(environ["NUMBA_CACHE_DIR"])
    return Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vctmae" / "numba"


if not os.environ.get("NUMBA_CACHE_DIR"):
    os.environ["NUMBA_CACHE_DIR"] = str(numba_cache_dir(os.environ))
    if "numba" in sys.modules:
        # numba read its settings when it was imported, and picks a function's cache folder
        # from them when the function is decorated: read them again.
        sys.modules["numba"].core.config.reload_config()
