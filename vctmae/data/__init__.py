"""vctmae.data — streaming loader: shards → int16 device batches → video frames (SPEC §4)."""

from vctmae.data.frames import (
    check_crop_shape,
    mirror,
    multiview_offsets,
    offset_frames,
    random_offsets,
    sample_frames,
)
from vctmae.data.loader import Batch, DevicePrefetcher, ShardLoader
from vctmae.data.shards import (
    ClassError,
    ShardError,
    check_classes,
    count_samples,
    expand_shards,
    shard_label,
)
from vctmae.data.zarr_store import ZarrCrops, read_manifest

__all__ = [
    "Batch",
    "ClassError",
    "DevicePrefetcher",
    "ShardError",
    "ShardLoader",
    "ZarrCrops",
    "check_classes",
    "check_crop_shape",
    "count_samples",
    "expand_shards",
    "mirror",
    "multiview_offsets",
    "offset_frames",
    "random_offsets",
    "read_manifest",
    "sample_frames",
    "shard_label",
]
