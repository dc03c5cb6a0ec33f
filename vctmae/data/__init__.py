"""vctmae.data — streaming loader: shards → int16 device batches → video frames.

`loader.ShardLoader` reads shards into batches (`batch.Batch`), `options.LoaderOptions` is
what the commands set, `frames.FrameSampler` turns crops into the model's frames on the
device, `shards` indexes and checks shards, `cache` keeps every crop on the device,
`dali` is the optional DALI reader, `zarr_store` reads ingest's Zarr store.
"""

# The frame API, reachable as `vctmae.data.sample_frames` and `vctmae.data.multiview_offsets`.
# Loaded on first use: the command line imports `vctmae.data.options` without torch.
__all__ = ["multiview_offsets", "sample_frames"]


def __getattr__(name: str):
    if name in __all__:
        from vctmae.data import frames

        return getattr(frames, name)
    raise AttributeError(f"module 'vctmae.data' has no attribute {name!r}")
