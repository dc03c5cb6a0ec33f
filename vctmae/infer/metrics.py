"""Per-crop predictions and their metrics: the numbers, predictions.csv, curves and a table.

Torch-free (numpy; scikit-learn, matplotlib and rich when used).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True, kw_only=True)
class Predictions:
    """Per-crop results in key order: labels (−1 unlabelled) and fracture probabilities."""

    keys: list[str]
    labels: np.ndarray  # int64 (N,)
    probs: np.ndarray  # float64 (N,) mean softmax probability of class 1 (fracture)


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
