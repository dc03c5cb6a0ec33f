"""The decision threshold finetuning records beside its best checkpoint (issue 12, item 5).

A probability is only useful as a decision with a threshold, and 0.5 is an
arbitrary one: a classifier trained with class weights on a small set is rarely
calibrated there (the demo's seed 2 ranks fractures well, AUC 0.81, yet calls
too few of them at 0.5). Finetuning therefore records, with each new best
checkpoint, the threshold that maximises F1 on the validation predictions of
that very checkpoint: `best.safetensors` gets `best.threshold.json` beside it
(`threshold_path`). `vctmae eval` reports its metrics at 0.5 and at that
threshold; `vctmae predict` decides with it unless `--threshold` is given.

Pairing: `write_best` removes the old threshold file, writes the weights
(atomically, `write_model`), then the new threshold file (atomically). A crash
at any point leaves either the old pair, the old or new weights with no
threshold (readers then fall back to 0.5 and say so), or the new pair — never
weights with another checkpoint's threshold. The file also names the epoch it
belongs to.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vctmae.model.checkpoint import CheckpointError, ModelFiles, write_atomically, write_model

THRESHOLD_SUFFIX = ".threshold.json"
DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True, kw_only=True)
class DecisionThreshold:
    """The validation-optimal F1 threshold of one checkpoint, and what it was measured on."""

    threshold: float  # fracture when P(fracture) >= threshold
    f1: float  # validation F1 at `threshold`
    f1_at_half: float  # validation F1 at 0.5, for comparison
    epoch: int  # the finetuning epoch whose weights these are (1-based)
    multiview: int  # views per crop of the validation predictions
    samples: int  # validation crops
    positives: int  # of which fractured

    def to_json(self) -> dict[str, Any]:
        return {"kind": "vctmae-decision-threshold", **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DecisionThreshold:
        return cls(
            threshold=float(data["threshold"]),
            f1=float(data["f1"]),
            f1_at_half=float(data["f1_at_half"]),
            epoch=int(data["epoch"]),
            multiview=int(data["multiview"]),
            samples=int(data["samples"]),
            positives=int(data["positives"]),
        )


def threshold_path(weights: str | Path) -> Path:
    """`best.safetensors` → `best.threshold.json` (beside the weights and their `best.json`)."""
    return Path(weights).with_suffix(THRESHOLD_SUFFIX)


def f1_optimal_threshold(labels: np.ndarray, probs: np.ndarray) -> tuple[float, float] | None:
    """(threshold, F1) maximising the F1 of `probs >= threshold` against `labels` (0/1).

    Only the cuts between distinct probabilities can differ, so each is tried: the
    k highest probabilities called fractured. The threshold returned lies halfway
    between the lowest probability called fractured and the highest one not
    (a new scan's probability is as likely to fall just above as just below the
    validation values). Among equally good cuts the one nearest 0.5 wins. None when
    the labels hold no fracture (every threshold gives F1 0).
    """
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    positives = int((labels == 1).sum())
    if positives == 0 or labels.size == 0:
        return None
    order = np.argsort(-probs, kind="stable")
    ranked, hits = probs[order], np.cumsum(labels[order] == 1)
    # Cut after index i only where the next probability is lower (ties stay together).
    ends = np.flatnonzero(np.append(ranked[1:] < ranked[:-1], True))
    called = ends + 1
    f1 = 2.0 * hits[ends] / (called + positives)
    best_f1 = f1.max()
    candidates = []
    for end in ends[np.isclose(f1, best_f1, rtol=0, atol=1e-12)]:
        lowest_called = ranked[end]
        if end + 1 < ranked.size:
            below = ranked[end + 1]
            middle = (lowest_called + below) / 2.0
            threshold = middle if below < middle <= lowest_called else lowest_called
        else:
            threshold = lowest_called
        candidates.append(float(threshold))
    threshold = min(candidates, key=lambda t: (abs(t - DEFAULT_THRESHOLD), t))
    return threshold, float(best_f1)


def validation_threshold(
    labels: np.ndarray, probs: np.ndarray, *, epoch: int, multiview: int
) -> DecisionThreshold | None:
    """The record `write_best` keeps for a checkpoint validated with these predictions."""
    from vctmae.train.evaluate import compute_metrics

    found = f1_optimal_threshold(labels, probs)
    if found is None:
        return None
    threshold, f1 = found
    return DecisionThreshold(
        threshold=threshold,
        f1=f1,
        f1_at_half=compute_metrics(labels, probs)["f1"],
        epoch=epoch,
        multiview=multiview,
        samples=int(np.asarray(labels).size),
        positives=int((np.asarray(labels) == 1).sum()),
    )


def write_best(files: ModelFiles, path: str | Path, threshold: DecisionThreshold | None) -> Path:
    """Write the best weights at `path` and their threshold beside them (pairing: module doc)."""
    path = Path(path)
    threshold_path(path).unlink(missing_ok=True)
    write_model(files, path)
    if threshold is not None:
        text = (json.dumps(threshold.to_json(), indent=2) + "\n").encode()
        write_atomically(threshold_path(path), lambda handle: handle.write(text))
    return path


def read_threshold(weights: str | Path) -> DecisionThreshold | None:
    """The threshold recorded beside `weights`, or None when there is none."""
    path = threshold_path(weights)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("kind") != "vctmae-decision-threshold":
            raise ValueError("not a vctmae decision threshold")
        record = DecisionThreshold.from_json(data)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(
            f"{path}: unreadable decision threshold ({type(error).__name__}: {error}); "
            "delete it to decide at 0.5, or give --threshold"
        ) from None
    if not 0.0 <= record.threshold <= 1.0:
        raise CheckpointError(f"{path}: threshold {record.threshold} outside [0, 1]")
    return record
