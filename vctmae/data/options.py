"""How shards reach the device: the loader options every command that reads shards shares."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vctmae.clip import REFERENCE_LEVELS
from vctmae.data.batch import BACKENDS, CACHES
from vctmae.errors import UsageError
from vctmae.flags import flag

if TYPE_CHECKING:
    import torch

    from vctmae.data.loader import ShardLoader

# Torch-free on purpose: the command line imports this module to build its options.
LEVELS_HELP = (
    "Vertebra levels to use, by each sample's JSON `level`: all, or a list/ranges such as "
    f"{REFERENCE_LEVELS}. Default: pretrain all (the reference filters nothing); finetune "
    f"{REFERENCE_LEVELS}, the reference's finetuning set (VerSe 8-25, T13 out); eval the levels "
    "the checkpoint was finetuned on."
)


@dataclass(frozen=True, kw_only=True)
class LoaderOptions:
    """Loader settings. The worker count never changes which samples a batch holds
    (`vctmae.data.loader`); the backend may (DALI's reader orders samples its own way)."""

    workers: int = flag(2, "Loader worker processes per training process.", resumable=True)
    backend: str = flag("torch", "Loader backend: torch | dali.", name="--loader")
    # None: the command's default (`LEVELS_HELP`); the loader itself then keeps every level.
    levels: str | None = flag(None, LEVELS_HELP)
    cache: str = flag(
        "none",
        "none: stream the shards | device: load every crop into device memory once and "
        "gather batches there (the same batches; refused with the sizes when they do not fit).",
        resumable=True,
    )

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise UsageError(f"--workers must be >= 0, got {self.workers}")
        if self.backend not in BACKENDS:
            raise UsageError(f"--loader must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.cache not in CACHES:
            raise UsageError(f"--cache must be one of {', '.join(CACHES)}, got {self.cache!r}")
        if self.cache == "device" and self.backend == "dali":
            raise UsageError("--cache device replaces the loader's reading: use --loader torch")
        self.level_set()  # a bad --levels is a usage error now, not when the loader starts

    def level_set(self) -> frozenset[str] | None:
        """The levels `--levels` keeps, None for all (`vctmae.ingest.levels.parse_levels`)."""
        from vctmae.ingest.levels import parse_levels

        if self.levels is None or self.levels.strip().lower() == "all":
            return None
        return parse_levels(self.levels)

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
            levels=self.level_set(),
            cache=self.cache,
        )
