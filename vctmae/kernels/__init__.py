"""vctmae.kernels (see SPEC.md)."""
