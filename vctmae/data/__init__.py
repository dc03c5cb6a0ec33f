"""vctmae.data (see SPEC.md)."""
