"""vctmae.ingest (see SPEC.md)."""
