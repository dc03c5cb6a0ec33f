"""vctmae.train (see SPEC.md)."""
