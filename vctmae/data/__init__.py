"""vctmae.data — streaming loader: shards → int16 device batches → video frames (SPEC §4).

The public names load their module on first use (PEP 562), so importing
`vctmae.data.options` for the command line does not import torch.
"""

from vctmae.lazy import lazy_exports

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
    "shard_identity": "shards",
    "shard_label": "shards",
    "FLIPS": "frames",
    "FrameSampler": "frames",
    "check_boxes": "shards",
    "select_levels": "shards",
    "check_crop_shape": "frames",
    "mirror": "frames",
    "multiview_offsets": "frames",
    "offset_frames": "frames",
    "random_offsets": "frames",
    "sample_frames": "frames",
    # The frame API (the clip rules of `vctmae.clip`, SPEC §4).
    "FRAME_MODES": "vctmae.clip",
    "MAX_VIEWS": "vctmae.clip",
    "context_cut": "vctmae.clip",
    "draw_train_shifts": "vctmae.clip",
    "extent_from_bbox": "vctmae.clip",
    "extents_from_boxes": "vctmae.clip",
    "frame_index_tensor": "vctmae.clip",
    "frame_indices": "vctmae.clip",
    "shifts_from_uniform": "vctmae.clip",
    "train_shifts": "vctmae.clip",
    "view_shift_table": "vctmae.clip",
    "view_shifts": "vctmae.clip",
    "ZarrCrops": "zarr_store",
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
