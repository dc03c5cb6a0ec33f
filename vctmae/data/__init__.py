"""vctmae.data — streaming loader: shards → int16 device batches → video frames (SPEC §4)."""

from vctmae.data.frames import (
    mirror,
    multiview_offsets,
    offset_frames,
    random_offsets,
    sample_frames,
)
from vctmae.data.loader import Batch, DevicePrefetcher, ShardLoader
from vctmae.data.shards import ShardError, count_samples, expand_shards
from vctmae.data.zarr_store import ZarrCrops, read_manifest

__all__ = [
    "Batch",
    "DevicePrefetcher",
    "ShardError",
    "ShardLoader",
    "ZarrCrops",
    "count_samples",
    "expand_shards",
    "mirror",
    "multiview_offsets",
    "offset_frames",
    "random_offsets",
    "read_manifest",
    "sample_frames",
]
