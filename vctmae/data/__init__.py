"""vctmae.data — streaming loader: shards → int16 device batches → video frames (SPEC §4).

The public names load their module on first use (PEP 562), so importing
`vctmae.data.options` for the command line does not import torch.
"""

import importlib

_EXPORTS = {
    "Batch": "loader",
    "DevicePrefetcher": "loader",
    "ShardLoader": "loader",
    "LoaderOptions": "options",
    "ClassError": "shards",
    "ShardError": "shards",
    "check_classes": "shards",
    "count_samples": "shards",
    "expand_shards": "shards",
    "shard_label": "shards",
    "check_crop_shape": "frames",
    "mirror": "frames",
    "multiview_offsets": "frames",
    "offset_frames": "frames",
    "random_offsets": "frames",
    "sample_frames": "frames",
    "ZarrCrops": "zarr_store",
    "read_manifest": "zarr_store",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
