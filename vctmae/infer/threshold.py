"""The decision threshold finetuning records beside its best checkpoint.

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

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vctmae.clip import ClipRule
from vctmae.files import write_atomically
from vctmae.infer.metrics import compute_metrics
from vctmae.model.checkpoint import CheckpointError, ModelFiles, write_model

THRESHOLD_SUFFIX = ".threshold.json"
DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True, kw_only=True)
class DecisionThreshold:
    """The validation-optimal F1 threshold of one checkpoint, and what it was measured on."""

    threshold: float  # fracture when P(fracture) >= threshold
    f1: float  # validation F1 at `threshold`
    f1_at_half: float  # validation F1 at 0.5, for comparison
    epoch: int  # the finetuning epoch whose weights these are (1-based)
    samples: int  # validation crops
    positives: int  # of which fractured
    # The clip rule of the validation predictions: the threshold holds only for probabilities
    # computed the same way (`ClipRule.same_probabilities`).
    frames: str
    multiview: int
    combine: str

    def __post_init__(self) -> None:
        for name in ("threshold", "f1", "f1_at_half"):
            value = getattr(self, name)
            if type(value) not in (int, float) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        for name, low in (("epoch", 1), ("samples", 1), ("positives", 1)):
            value = getattr(self, name)
            if type(value) is not int or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.positives > self.samples:
            raise ValueError(f"positives {self.positives} exceed samples {self.samples}")
        self.rule()  # frames, multiview and combine must make a rule

    def rule(self) -> ClipRule:
        """The clip rule the threshold was measured with (its levels are not recorded)."""
        return ClipRule(frames=self.frames, multiview=self.multiview, combine=self.combine)

    def to_json(self) -> dict[str, Any]:
        return {"kind": KIND, **asdict(self)}

    @classmethod
    def from_json(cls, data: Any) -> DecisionThreshold:
        """The record `to_json` wrote; ValueError for a missing, unknown or ill-typed field."""
        if not isinstance(data, dict) or data.get("kind") != KIND:
            raise ValueError("not a vctmae decision threshold")
        fields = {key: value for key, value in data.items() if key != "kind"}
        expected = {f.name for f in dataclasses.fields(cls)}
        if set(fields) != expected:
            missing, unknown = sorted(expected - set(fields)), sorted(set(fields) - expected)
            raise ValueError(f"fields missing {missing or 'none'}, unknown {unknown or 'none'}")
        return cls(**fields)


KIND = "vctmae-decision-threshold"


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
    labels: np.ndarray, probs: np.ndarray, *, epoch: int, rule: ClipRule
) -> DecisionThreshold | None:
    """The record `write_best` keeps for a checkpoint validated with these predictions."""
    found = f1_optimal_threshold(labels, probs)
    if found is None:
        return None
    threshold, f1 = found
    return DecisionThreshold(
        threshold=threshold,
        f1=f1,
        f1_at_half=compute_metrics(labels, probs)["f1"],
        epoch=epoch,
        samples=int(np.asarray(labels).size),
        positives=int((np.asarray(labels) == 1).sum()),
        frames=rule.frames,
        multiview=rule.multiview,
        combine=rule.combine,
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
        return DecisionThreshold.from_json(json.loads(path.read_text()))
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as error:
        raise CheckpointError(
            f"{path}: unreadable decision threshold ({error}); delete it to decide at 0.5, "
            "or give --threshold"
        ) from None


@dataclass(frozen=True, kw_only=True)
class ThresholdChoice:
    """The threshold a command decides with, where it came from, and why (one line)."""

    value: float
    source: str  # "--threshold" | "validation" | "default"
    detail: str
    record: DecisionThreshold | None = None


def choose_threshold(weights: Path, rule: ClipRule, given: float | None = None) -> ThresholdChoice:
    """`given` (`--threshold`); else the validation-optimal threshold recorded beside `weights`
    when it was measured with probabilities computed by `rule`; else 0.5, saying why."""
    if given is not None:
        return ThresholdChoice(value=given, source="--threshold", detail="given with --threshold")
    recorded = read_threshold(weights)
    if recorded is None:
        return ThresholdChoice(
            value=DEFAULT_THRESHOLD,
            source="default",
            detail=f"the default: no {threshold_path(weights).name} beside the checkpoint "
            "(finetuning without validation data)",
        )
    if not recorded.rule().same_probabilities(rule):
        return ThresholdChoice(
            value=DEFAULT_THRESHOLD,
            source="default",
            detail=f"the default: the threshold in {threshold_path(weights).name} was measured "
            f"with {_probability_rule(recorded.rule())}, this run computes probabilities with "
            f"{_probability_rule(rule)}",
        )
    views = "1 view" if recorded.multiview == 1 else f"{recorded.multiview} views"
    return ThresholdChoice(
        value=recorded.threshold,
        source="validation",
        detail=f"the validation-optimal F1 threshold finetuning recorded (epoch {recorded.epoch}; "
        f"{recorded.samples} validation vertebrae, {recorded.positives} fractured, {views}; "
        f"F1 {recorded.f1:.3f} there vs {recorded.f1_at_half:.3f} at 0.5)",
        record=recorded,
    )


def _probability_rule(rule: ClipRule) -> str:
    return f"--frames {rule.frames} --multiview {rule.multiview} --combine {rule.combine}"
