"""Helpers the tests share: readers of what the product writes, and writers of small inputs.

Nothing in the package calls these; they live here so the package holds only what it runs.
Tests import them with `from helpers import …` (pytest puts this folder on `sys.path`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from vctmae.infer.metrics import Predictions
from vctmae.ingest.nifti import Volume, read_nifti_ct, read_nifti_labels
from vctmae.ingest.writers import Sample, write_shards


def load_ct(path: str | Path) -> Volume:
    """A NIfTI CT as float32 HU (its scaling applied), whole; rejects NaN/inf voxels."""
    stored = read_nifti_ct(path)
    data = stored.data.astype(np.float32)
    if stored.slope != 1.0:
        data *= np.float32(stored.slope)
    if stored.intercept != 0.0:
        data += np.float32(stored.intercept)
    return Volume(path=stored.path, data=data, affine=stored.affine)


def load_labels(path: str | Path) -> Volume:
    """A NIfTI label map as a C-order non-negative integer array (uint8/uint16/int32)."""
    stored = read_nifti_labels(path)
    data = stored.data
    if data.dtype.kind == "i" and data.size and data.min() < 0:
        # Negative values are no vertebra in any scheme; treat them as background.
        data = np.clip(data, 0, None)
    top = int(data.max()) if data.size else 0
    dtype = np.uint8 if top < 2**8 else np.uint16 if top < 2**16 else np.int32
    return replace(stored, data=np.ascontiguousarray(data, dtype=dtype))


def read_log(path: Path) -> list[dict[str, Any]]:
    """All records of a training run's JSONL log."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def read_predictions(path: Path) -> Predictions:
    """The keys, labels and probabilities of a predictions.csv (`eval`, `predict`)."""
    with Path(path).open() as f:
        rows = list(csv.DictReader(f))
    return Predictions(
        keys=[r["key"] for r in rows],
        labels=np.array([int(r["label"]) for r in rows], dtype=np.int64),
        probs=np.array([float(r["prob_fracture"]) for r in rows]),
    )


def write_shard(path: Path, samples: Iterable[Sample]) -> Path:
    """One shard at `path`, which must be named like ingest's first shard (`{split}-000000.tar`)."""
    path = Path(path)
    split = path.name.removesuffix("-000000.tar")
    if split == path.name or not split:
        raise ValueError(f"{path.name}: a first shard is named {{split}}-000000.tar")
    [written] = write_shards(path.parent, split, [samples])
    return written


def random_shards(folder: Path, count: int, seed: int = 0) -> list[str]:
    """A labelled training shard of `count` random int16 crops (classes alternate)."""
    rng = np.random.default_rng(seed)
    samples = (
        (f"random{i:05d}_L1", rng.integers(-1200, 1500, size=(96, 96, 96), dtype=np.int16), i % 2)
        for i in range(count)
    )
    return [str(path) for path in write_shards(folder, "train", [samples])]


def latest_checkpoint(run_dir: Path, kind: str) -> tuple[Path, Path] | None:
    """(weights, state) of the newest checkpoint of `kind` in a run folder, or None."""
    from vctmae.train.checkpoint import checkpoint_candidates

    candidates = checkpoint_candidates(run_dir, kind)
    return (candidates[0].weights, candidates[0].state) if candidates else None
