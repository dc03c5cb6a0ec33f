"""How shards reach the device: the loader options every command that reads shards shares."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vctmae.errors import UsageError
from vctmae.flags import flag

if TYPE_CHECKING:
    import torch

    from vctmae.data.loader import ShardLoader

# Torch-free on purpose: the command line imports this module to build its options.
BACKENDS = ("torch", "dali")


@dataclass(frozen=True, kw_only=True)
class LoaderOptions:
    """Loader settings. The worker count never changes which samples a batch holds
    (`vctmae.data.loader`); the backend may (DALI's reader orders samples its own way)."""

    workers: int = flag(2, "Loader worker processes per training process.", resumable=True)
    backend: str = flag("torch", "Loader backend: torch | dali.", name="--loader")

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise UsageError(f"--workers must be >= 0, got {self.workers}")
        if self.backend not in BACKENDS:
            raise UsageError(f"--loader must be one of {', '.join(BACKENDS)}, got {self.backend!r}")

    def build(
        self,
        shards: Sequence[str],
        *,
        batch_size: int,
        training: bool,
        device: torch.device,
        seed: int = 0,
    ) -> ShardLoader:
        """A `ShardLoader` over `shards` with these settings."""
        from vctmae.data.loader import ShardLoader

        return ShardLoader(
            shards,
            batch_size=batch_size,
            training=training,
            seed=seed,
            num_workers=self.workers,
            device=device,
            backend=self.backend,
        )
