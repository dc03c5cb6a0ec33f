"""vctmae.ingest: raw spine CT + vertebra label maps → int16 crops in shards and Zarr.

Entry point: `run_ingest(IngestConfig(...))`. The names are imported lazily so
that light modules of this package (e.g. `levels`) do not pull in scipy/zarr.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vctmae.ingest.pipeline import IngestConfig, run_ingest

__all__ = ["IngestConfig", "run_ingest"]


def __getattr__(name: str):
    if name in __all__:
        from vctmae.ingest import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'vctmae.ingest' has no attribute {name!r}")
