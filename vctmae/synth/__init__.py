"""Synthetic spine CT phantoms for demos, tests and benchmarks (`vctmae synth`).

`SynthConfig` (here, light at import: the command line builds its options from it) says which
phantoms to write and where; `vctmae.synth.phantoms` draws and writes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vctmae.errors import UsageError
from vctmae.flags import flag


@dataclass(frozen=True, kw_only=True)
class SynthConfig:
    """Which phantoms `write_phantoms` writes, and where; the same config writes the same bytes."""

    out: Path = flag(help="Folder to write ct/, seg/ and labels.csv into.")
    cases: int = flag(24, "Number of CT cases to write (at least 1).")
    seed: int = flag(0, "Random seed; the same seed writes byte-identical files.")
    fracture_rate: float = flag(0.25, "Probability that an inner vertebra is fractured (0–1).")
    clinical: bool = flag(
        False,
        "Clinical-size cases: 512 x 512 x ~330 voxels of ~0.7 x 0.7 x 1.1 mm, 12–14 vertebrae "
        "(~60 MB each), for benchmarks.",
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        if self.cases < 1:
            raise UsageError(f"--cases must be at least 1, got {self.cases}")
        if not 0.0 <= self.fracture_rate <= 1.0:
            raise UsageError(f"--fracture-rate must lie in [0, 1], got {self.fracture_rate}")
        if self.seed < 0:
            raise UsageError(f"--seed must be non-negative, got {self.seed}")
