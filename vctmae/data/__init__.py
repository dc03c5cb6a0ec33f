"""vctmae.data — streaming loader: shards → int16 device batches → video frames.

The public names load their module on first use (PEP 562), so importing
`vctmae.data.options` for the command line does not import torch.
"""

from vctmae.lazy import lazy_exports

_EXPORTS = {
    "Batch": "batch",
    "DevicePrefetcher": "loader",
    "ShardLoader": "loader",
    "LoaderOptions": "options",
    "ClassError": "shards",
    "ShardError": "shards",
    "check_classes": "shards",
    "count_samples": "shards",
    "expand_shards": "shards",
    "shard_identity": "shards",
    "shard_label": "shards",
    "FrameSampler": "frames",
    "check_boxes": "shards",
    "select_levels": "shards",
    "check_crop_shape": "frames",
    "mirror": "frames",
    "multiview_offsets": "frames",
    "offset_frames": "frames",
    "random_offsets": "frames",
    "sample_frames": "frames",
    "ZarrCrops": "zarr_store",
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
