"""vctmae.ingest: raw spine CT + vertebra label maps → int16 crops in shards and Zarr.

Entry point: `vctmae.ingest.pipeline.run_ingest(IngestConfig(...))`, the config in
`vctmae.ingest.config` (light at import: the command line builds its options from it).
"""
