"""One probability per crop from its views, over a loader and across ranks.

The prediction of a crop combines its views (`--multiview 6`: crop mode's offsets
0..5, which together cover every sagittal slice once, or in mask mode the sample's
own 3–6 shifts; `--multiview 1`: the middle offset 3, mask mode shift 0):
`--combine probs` (default) averages the views' softmax probabilities, `--combine
logits` averages their logits and takes the softmax of the mean (the reference
code). The predicted class is the argmax, i.e. fracture when its probability is
>= 0.5. A 3-D model (`mae3d-*`) sees each crop whole, in one view, whatever `--multiview`.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import torch
from torch import nn

from vctmae.errors import VctmaeError
from vctmae.infer import distributed
from vctmae.infer.device import autocast_context
from vctmae.infer.metrics import Predictions


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


@torch.no_grad()
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
    """Each crop's `views` views combined (`multiview_probs`), the predictions of all ranks
    gathered and deduplicated (identical on every rank)."""
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
        local = Predictions(keys=[], labels=np.zeros(0, np.int64), probs=np.zeros(0))
    else:
        local = Predictions(
            keys=keys,
            labels=torch.cat(labels).cpu().numpy().astype(np.int64),
            probs=torch.cat(probs).double().cpu().numpy(),
        )
    return merge_predictions(distributed.gather_objects(local))
