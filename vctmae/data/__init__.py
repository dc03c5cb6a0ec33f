"""vctmae.data — streaming loader: shards → int16 device batches → video frames.

`loader.ShardLoader` reads shards into batches (`batch.Batch`), `options.LoaderOptions` is
what the commands set, `frames.FrameSampler` turns crops into the model's frames on the
device, `shards` indexes and checks shards, `cache` keeps every crop on the device,
`dali` is the optional DALI reader, `zarr_store` reads ingest's Zarr store.
"""
