"""vctmae.model (see SPEC.md)."""
