"""Commands of this stage (filled in by its issue)."""
