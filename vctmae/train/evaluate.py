"""Multi-view evaluation: one prediction per crop key, metrics, plots (SPEC §7).

The prediction of a crop combines its views (`--multiview 6`: crop mode's offsets
0..5, which together cover every sagittal slice once, or in mask mode the sample's
own 3–6 shifts; `--multiview 1`: the middle offset 3, mask mode shift 0):
`--combine probs` (default) averages the views' softmax probabilities, `--combine
logits` averages their logits and takes the softmax of the mean (the reference
code). The predicted class is the argmax, i.e. fracture when its probability is
>= 0.5. A 3-D model (`mae3d-*`) sees each crop whole, in one view, whatever `--multiview`.
When finetuning recorded a validation-optimal threshold beside the checkpoint
(`vctmae.train.threshold`), metrics.json also holds the metrics at that threshold
(`at_validation_threshold`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vctmae.clip import ClipRule, resolve_rule
from vctmae.errors import VctmaeError
from vctmae.progress import warn
from vctmae.train import distributed
from vctmae.train.config import EvalConfig, config_dict
from vctmae.train.loop import autocast_context
from vctmae.train.runlog import RunLog
from vctmae.train.speed import apply_speedups


@dataclass(frozen=True, kw_only=True)
class Predictions:
    """Per-crop results in key order: labels (−1 unlabelled) and fracture probabilities."""

    keys: list[str]
    labels: np.ndarray  # int64 (N,)
    probs: np.ndarray  # float64 (N,) mean softmax probability of class 1 (fracture)


class DuplicatePredictionError(VctmaeError, RuntimeError):
    """A crop key was predicted more than once (overlapping shards or ranks)."""


@torch.no_grad()
def multiview_probs(
    model: nn.Module,
    crops: torch.Tensor,
    *,
    views: int,
    device: torch.device,
    precision: str = "auto",
    frames: str = "crop",
    boxes: torch.Tensor | None = None,
    combine: str = "probs",
) -> torch.Tensor:
    """P(fracture) of each crop (B,) from its `views` views (6: the full ensemble; 1).

    frames: the frame rule (`--frames`); mask mode needs the crops' JSON mask `boxes` (B, 6) and
    gives each sample its own number of views (the table's `valid` mask leaves the padding out).
    combine: "probs" — mean over a sample's views of softmax(logits)[1]; "logits" — softmax of
    the mean logits (the reference, src/finetuning/model.py:70-73).
    """
    from vctmae.data.frames import FrameSampler
    from vctmae.model.checkpoint import unwrap

    # A 3-D model reads the whole crop: one view (`FrameSampler.view_table`).
    sampler = FrameSampler(mode=frames, volume=unwrap(model).config.volume)
    shifts, valid = sampler.view_table(crops, boxes, views)  # (B, V) each
    weight = valid.to(torch.float32)  # (B, V): 1 for a real view, 0 for padding
    total = None
    for view in range(shifts.shape[1]):
        view_crops, view_frames = sampler.view_input(crops, boxes, shifts[:, view])
        with autocast_context(device, precision):
            logits = model(view_crops, view_frames)
        logits = logits.float()
        # (B,) probabilities or (B, C) logits of this view, zero where it is padding.
        value = torch.softmax(logits, dim=-1)[:, 1] if combine == "probs" else logits
        value = value * (weight[:, view] if value.dim() == 1 else weight[:, view, None])
        total = value if total is None else total + value
    count = weight.sum(1)  # (B,)
    if combine == "probs":
        return total / count
    return torch.softmax(total / count[:, None], dim=-1)[:, 1]


@torch.no_grad()
def predict_local(
    model: nn.Module,
    loader: Any,
    *,
    views: int,
    device: torch.device,
    precision: str = "auto",
    frames: str = "crop",
    combine: str = "probs",
) -> Predictions:
    """This rank's predictions: each crop's `views` views combined (`multiview_probs`)."""
    was_training = model.training
    model.eval()
    keys: list[str] = []
    labels, probs = [], []
    for batch in loader:
        probs.append(
            multiview_probs(
                model,
                batch.crops,
                views=views,
                device=device,
                precision=precision,
                frames=frames,
                boxes=batch.boxes,
                combine=combine,
            )
        )
        labels.append(batch.labels)
        keys.extend(batch.keys)
    model.train(was_training)
    if not keys:
        return Predictions(keys=[], labels=np.zeros(0, np.int64), probs=np.zeros(0))
    return Predictions(
        keys=keys,
        labels=torch.cat(labels).cpu().numpy().astype(np.int64),
        probs=torch.cat(probs).double().cpu().numpy(),
    )


def merge_predictions(parts: list[Predictions]) -> Predictions:
    """Concatenate per-rank predictions, sorted by key; refuse duplicated keys."""
    keys = [k for p in parts for k in p.keys]
    repeated = [k for k, n in Counter(keys).items() if n > 1]
    if repeated:
        raise DuplicatePredictionError(
            f"{len(repeated)} crop key(s) predicted more than once, e.g. {repeated[:3]}: "
            "are the same shards listed twice?"
        )
    labels = np.concatenate([p.labels for p in parts]) if keys else np.zeros(0, np.int64)
    probs = np.concatenate([p.probs for p in parts]) if keys else np.zeros(0)
    order = np.argsort(np.asarray(keys), kind="stable")
    return Predictions(keys=[keys[i] for i in order], labels=labels[order], probs=probs[order])


def predict(
    model: nn.Module,
    loader: Any,
    *,
    views: int,
    device: torch.device,
    precision: str = "auto",
    frames: str = "crop",
    combine: str = "probs",
) -> Predictions:
    """Predictions of all ranks, gathered and deduplicated (identical on every rank)."""
    local = predict_local(
        model,
        loader,
        views=views,
        device=device,
        precision=precision,
        frames=frames,
        combine=combine,
    )
    return merge_predictions(distributed.gather_objects(local))


def compute_metrics(
    labels: np.ndarray, probs: np.ndarray, *, threshold: float = 0.5
) -> dict[str, Any]:
    """F1, accuracy, ROC-AUC, AP, sensitivity, specificity, confusion matrix (scikit-learn).

    A crop is called fractured when its probability is >= `threshold`. ROC-AUC and AP
    (threshold-free) are None when the labels hold a single class.
    """
    from sklearn import metrics as sk

    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    predicted = (probs >= threshold).astype(np.int64)
    matrix = sk.confusion_matrix(labels, predicted, labels=[0, 1])
    (tn, fp), (fn, tp) = matrix
    both = len(np.unique(labels)) == 2
    return {
        "n": int(labels.size),
        "positives": int((labels == 1).sum()),
        "f1": float(sk.f1_score(labels, predicted, zero_division=0)),
        "accuracy": float(sk.accuracy_score(labels, predicted)),
        "roc_auc": float(sk.roc_auc_score(labels, probs)) if both else None,
        "average_precision": float(sk.average_precision_score(labels, probs)) if both else None,
        "sensitivity": float(tp / (tp + fn)) if tp + fn else None,
        "specificity": float(tn / (tn + fp)) if tn + fp else None,
        "confusion_matrix": matrix.tolist(),  # rows: true 0/1, columns: predicted 0/1
    }


# predictions.csv's columns (`vctmae predict` writes these first, then its own).
PREDICTION_COLUMNS = ("key", "label", "prob_fracture", "predicted")


def prediction_row(key: str, label: int, prob: float, threshold: float = 0.5) -> list[Any]:
    """One predictions.csv row in `PREDICTION_COLUMNS` order (label −1: unlabelled)."""
    return [key, int(label), f"{prob:.8f}", int(prob >= threshold)]


def write_predictions(predictions: Predictions, path: Path) -> Path:
    """predictions.csv, written atomically (a crash or full disk leaves no partial file)."""
    from vctmae.files import write_atomically

    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(PREDICTION_COLUMNS)
    for key, label, prob in zip(
        predictions.keys, predictions.labels, predictions.probs, strict=True
    ):
        writer.writerow(prediction_row(key, label, prob))
    data = text.getvalue().encode()
    return write_atomically(path, lambda handle: handle.write(data))


def plot_curves(labels: np.ndarray, probs: np.ndarray, out: Path) -> list[Path]:
    """ROC and precision–recall curves as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn import metrics as sk

    from vctmae.files import write_atomically

    paths = []
    fpr, tpr, _ = sk.roc_curve(labels, probs)
    precision, recall, _ = sk.precision_recall_curve(labels, probs)
    auc = sk.roc_auc_score(labels, probs)
    ap = sk.average_precision_score(labels, probs)
    for name, (x, y), (xl, yl), label in (
        (
            "roc.png",
            (fpr, tpr),
            ("false positive rate", "true positive rate"),
            f"ROC-AUC {auc:.3f}",
        ),
        ("pr.png", (recall, precision), ("recall", "precision"), f"AP {ap:.3f}"),
    ):
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot(x, y, label=label)
        if name == "roc.png":
            ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=0.8)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.legend(loc="lower right")
        fig.tight_layout()
        path = write_atomically(
            out / name, lambda handle, fig=fig: fig.savefig(handle, format="png", dpi=100)
        )
        plt.close(fig)
        paths.append(path)
    return paths


def metrics_table(metrics: dict[str, Any], title: str = "evaluation"):
    """A short rich table of the headline metrics."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name in (
        "n",
        "positives",
        "f1",
        "accuracy",
        "roc_auc",
        "average_precision",
        "sensitivity",
        "specificity",
    ):
        value = metrics.get(name)
        text = "—" if value is None else (str(value) if isinstance(value, int) else f"{value:.4f}")
        table.add_row(name, text)
    (tn, fp), (fn, tp) = metrics["confusion_matrix"]
    table.add_row("confusion tn fp / fn tp", f"{tn} {fp} / {fn} {tp}")
    return table


def eval_rule(config: EvalConfig, recorded: ClipRule | None, *, say: bool) -> ClipRule:
    """The clip rule eval applies: the checkpoint's, with the options given explicitly (each one
    that differs from the checkpoint's said in one line)."""
    rule, lines = resolve_rule(
        recorded,
        who=str(config.checkpoint),
        frames=config.frames,
        multiview=config.multiview,
        combine=config.combine,
        levels=config.loader.levels,
    )
    if say:
        for line in lines:
            warn(line)
    return rule


def run_eval(config: EvalConfig) -> dict[str, Any]:
    """Evaluate a classifier checkpoint on shards; writes predictions.csv, metrics.json, roc.png, pr.png.

    The frames, views, combination and levels are the clip rule the checkpoint was finetuned
    with unless the options say otherwise (`eval_rule`); the crops of other levels are left
    out, and how many is said.
    """
    from rich.console import Console

    from vctmae.data import check_boxes, check_classes, check_crop_shape, expand_shards
    from vctmae.files import write_atomically
    from vctmae.model.checkpoint import load_classifier, read_model_description
    from vctmae.train.config import refuse_frame_options
    from vctmae.train.threshold import choose_threshold

    info = distributed.setup(config.device)
    out = Path(config.out)
    model = load_classifier(config.checkpoint).to(info.device)
    rule = eval_rule(config, read_model_description(config.checkpoint).clip, say=info.is_main)
    loader_options = dataclasses.replace(config.loader, levels=rule.levels)
    refuse_frame_options(model.config, str(config.checkpoint), frames=rule.frames)
    speed = config.speed
    module = apply_speedups(
        model, patch_embed=speed.patch_embed, compile=speed.compile, device=info.device
    )
    shards = expand_shards(list(config.shards))
    loader = loader_options.build(
        shards, batch_size=config.batch_size, training=False, device=info.device
    )
    # Checked from the shard index before anything is predicted or written: metrics need every
    # crop labelled 0 or 1; unlabelled shards on their own get predictions only.
    unlabelled_only = all(bool((index.labels == -1).all()) for index in loader.indexes)
    check_classes(
        loader.indexes,
        role="evaluated samples (--shards; evaluate unlabelled shards on their own)",
        allow_unlabelled=unlabelled_only,
    )
    first = loader.indexes[0]
    check_crop_shape(
        first.shape, where=first.path, image_size=model.config.img, volume=model.config.volume
    )
    if rule.frames == "mask":
        check_boxes(loader.indexes)
    if loader.dropped_levels and info.is_main:
        warn(
            f"--levels {rule.levels}: {loader.dropped_levels} crop(s) of other levels left out; "
            f"{loader.num_samples} evaluated"
        )
    predictions = predict(
        module,
        loader,
        views=rule.multiview,
        device=info.device,
        precision=speed.precision,
        frames=rule.frames,
        combine=rule.combine,
    )
    if len(predictions.keys) != loader.num_samples:
        raise RuntimeError(
            f"{shards[0]}…: {len(predictions.keys)} predictions for the {loader.num_samples} "
            "crops the shards hold at the selected levels"
        )
    views = {
        "multiview": rule.multiview,
        "frames": rule.frames,
        "combine": rule.combine,
        "levels": rule.levels,
        "left_out_by_levels": loader.dropped_levels,
    }
    result: dict[str, Any] = {"predictions": len(predictions.keys), **views}
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_predictions(predictions, out / "predictions.csv")
        labelled = bool(predictions.keys) and bool((predictions.labels >= 0).all())
        if labelled:
            metrics = compute_metrics(predictions.labels, predictions.probs)
            # Also at the validation-optimal threshold finetuning recorded beside the weights,
            # when it holds for the probabilities of this rule.
            choice = choose_threshold(Path(config.checkpoint), rule)
            if choice.record is not None:
                metrics["at_validation_threshold"] = {
                    "threshold": choice.value,
                    "threshold_epoch": choice.record.epoch,
                    **compute_metrics(
                        predictions.labels, predictions.probs, threshold=choice.value
                    ),
                }
            else:
                metrics["validation_threshold_unused"] = choice.detail
            if metrics["roc_auc"] is not None:
                plot_curves(predictions.labels, predictions.probs, out)
        else:
            metrics = {"n": len(predictions.keys), "note": "unlabelled crops: predictions only"}
        metrics.update(checkpoint=str(config.checkpoint), **views)
        text = (json.dumps(metrics, indent=2) + "\n").encode()
        write_atomically(out / "metrics.json", lambda handle: handle.write(text))
        log = RunLog(out / "log.jsonl")
        log.start(
            command="eval",
            config=config_dict(config),
            world_size=info.world_size,
            device=str(info.device),
        )
        log.write("metrics", **metrics)
        if labelled and config.progress:
            Console().print(metrics_table(metrics, title=f"eval --multiview {rule.multiview}"))
            if "at_validation_threshold" in metrics:
                tuned = metrics["at_validation_threshold"]
                title = f"at the validation-optimal threshold {tuned['threshold']:.4f}"
                Console().print(metrics_table(tuned, title=title))
        result.update(metrics)
    distributed.barrier()
    return result
