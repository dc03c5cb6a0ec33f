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
from dataclasses import dataclass
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


@dataclass(frozen=True, kw_only=True)
class Assessment:
    """What one pass over a batch of crops gives (`assess`).

    The shown view is the one a picture draws: every crop's view `shown` (default the middle
    one, `clip.middle_shift`), or its first view where `shown` is not among its views (mask
    mode's narrowest vertebrae have no shift 0); `shown_shifts` says which.
    """

    probs: torch.Tensor  # (B,) P(fracture), the crop's views combined
    shown_shifts: torch.Tensor  # (B,) the shown view's shift
    shown_probs: torch.Tensor  # (B,) P(fracture) of the shown view alone
    # Per layer (B, heads, 1+L, 1+L): the shown view's attention probabilities (attention=True).
    maps: list[torch.Tensor] | None


def _shown_first(
    shifts: torch.Tensor, valid: torch.Tensor, shown: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The view table (B, V) with each crop's view `shown` swapped into column 0, and the
    per-row column order (B, V) that did it (a swap: applying it again restores the table)."""
    column = ((shifts == shown) & valid).to(torch.int64).argmax(1, keepdim=True)  # (B, 1)
    order = torch.arange(shifts.shape[1], device=shifts.device).expand_as(shifts).clone()
    order.scatter_(1, column, 0)
    order[:, :1] = column
    return shifts.gather(1, order), order


@torch.no_grad()
def assess(
    model: nn.Module,
    crops: torch.Tensor,
    *,
    views: int,
    device: torch.device,
    precision: str = "auto",
    frames: str = "crop",
    boxes: torch.Tensor | None = None,
    combine: str = "probs",
    attention: bool = False,
    shown: int | None = None,
) -> Assessment:
    """P(fracture) of each crop (B,) from its `views` views (6: the full ensemble; 1), and that of
    its shown view, whose attention maps come from the same forward pass when `attention`.

    frames: the frame rule (`--frames`); mask mode needs the crops' JSON mask `boxes` (B, 6) and
    gives each sample its own number of views (the table's `valid` mask leaves the padding out).
    combine: "probs" — mean over a sample's views of softmax(logits)[1]; "logits" — softmax of
    the mean logits (the reference, src/finetuning/model.py:70-73).
    precision: 'bf16' or 'fp32' as resolved (`resolve_precision`); 'auto' is training's choice.
    The shown view is computed first (in column 0), through the explicit attention path of the
    plain model when `attention`; the views are summed in the table's order either way, so the
    probabilities do not depend on which view is shown.
    """
    from vctmae import clip
    from vctmae.data.frames import FrameSampler
    from vctmae.model.checkpoint import unwrap
    from vctmae.model.vit import encode_with_attention

    plain = unwrap(model)
    # A 3-D model reads the whole crop: one view (`FrameSampler.view_table`).
    sampler = FrameSampler(mode=frames, volume=plain.config.volume)
    table, valid = sampler.view_table(crops, boxes, views)  # (B, V) each
    shown = clip.middle_shift(frames) if shown is None else shown
    shifts, order = _shown_first(table, valid, shown)
    maps = None
    values = []
    for view in range(shifts.shape[1]):
        view_crops, view_frames = sampler.view_input(crops, boxes, shifts[:, view])
        with autocast_context(device, precision):
            if attention and view == 0:
                hidden, maps = encode_with_attention(plain, view_crops, view_frames)
                logits = plain.classify(hidden)
            else:
                logits = model(view_crops, view_frames)
        values.append(logits.float())  # (B, C)
    # Back to the table's column order (the swap undone), then summed in that order.
    logits = torch.stack(values, 1).gather(1, order[:, :, None].expand(-1, -1, values[0].shape[-1]))
    weight = valid.to(torch.float32)  # (B, V): 1 for a real view, 0 for padding
    total = None
    for view in range(logits.shape[1]):
        # (B,) probabilities or (B, C) logits of this view, zero where it is padding.
        value = (
            torch.softmax(logits[:, view], dim=-1)[:, 1] if combine == "probs" else logits[:, view]
        )
        value = value * (weight[:, view] if value.dim() == 1 else weight[:, view, None])
        total = value if total is None else total + value
    count = weight.sum(1)  # (B,)
    probs = total / count if combine == "probs" else torch.softmax(total / count[:, None], -1)[:, 1]
    return Assessment(
        probs=probs,
        shown_shifts=shifts[:, 0],
        shown_probs=torch.softmax(values[0], dim=-1)[:, 1],
        maps=maps,
    )


def multiview_probs(model: nn.Module, crops: torch.Tensor, **options: Any) -> torch.Tensor:
    """P(fracture) of each crop (B,): `assess(model, crops, **options).probs`."""
    return assess(model, crops, **options).probs


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
    """Each crop's `views` views combined (`assess`), the predictions of all ranks
    gathered and deduplicated (identical on every rank)."""
    was_training = model.training
    model.eval()
    keys: list[str] = []
    labels, probs = [], []
    for batch in loader:
        probs.append(
            assess(
                model,
                batch.crops,
                views=views,
                device=device,
                precision=precision,
                frames=frames,
                boxes=batch.boxes,
                combine=combine,
            ).probs
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
