"""`vctmae explain`: the attention picture of one crop of a Zarr store (`vctmae.infer.attention`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vctmae import clip
from vctmae.data.zarr_store import MissingKeyError, ZarrCrops, ZarrStoreError
from vctmae.errors import UsageError
from vctmae.infer.attention import explain_crop, refuse_volume, save_explanation
from vctmae.infer.config import ExplainConfig
from vctmae.infer.device import resolve_precision
from vctmae.model.checkpoint import load_classifier, read_model_description
from vctmae.progress import warn


def run_explain(config: ExplainConfig) -> dict[str, Any]:
    """Write the attention picture of `config.key`; returns its probabilities and path.

    The frames, views and combination are the clip rule the checkpoint was finetuned with
    unless the options say otherwise (each difference said in one line).
    """
    model = load_classifier(config.checkpoint)
    refuse_volume(model.config, str(config.checkpoint))
    rule, lines = clip.resolve_rule(
        read_model_description(config.checkpoint).clip,
        who=str(config.checkpoint),
        frames=config.frames,
        multiview=config.multiview,
        combine=config.combine,
    )
    for line in lines:
        warn(line)
    if not Path(config.zarr).exists():
        raise ZarrStoreError(f"{config.zarr}: Zarr store not found")
    store = ZarrCrops(config.zarr)
    if config.key not in store:
        raise MissingKeyError(
            f"{config.zarr}: no crop with key {config.key!r} ({len(store.keys)} keys)"
        )
    bbox = store.bbox(config.key) if rule.frames == "mask" else None
    extent = clip.FULL_EXTENT if bbox is None else clip.extent_from_bbox(bbox)
    # The shown view is one of the rule's views: its picture and probability come from the
    # pass that combines them.
    shifts = (
        [clip.middle_shift(rule.frames)]
        if rule.multiview == 1
        else clip.view_shifts(rule.frames, extent)
    )
    shift = clip.middle_shift(rule.frames) if config.offset is None else config.offset
    if shift not in shifts:
        raise UsageError(
            f"--offset {shift}: the views of {config.key} under --frames {rule.frames} "
            f"--multiview {rule.multiview} are "
            f"{', '.join(map(str, shifts))}"
        )
    device = torch.device(config.device)
    precision = resolve_precision(config.precision, device, inference=True)
    result = explain_crop(
        model.to(device), store.crop(config.key), rule, shift=shift, bbox=bbox, precision=precision
    )
    label = store.label(config.key)
    truth = {0: "no fracture", 1: "fracture"}.get(label, "unlabelled")
    views = "1 view" if rule.multiview == 1 else f"{rule.multiview} views"
    title = (
        f"{config.key} ({truth}): P(fracture) = {result['prob_multiview']:.3f} ({views}, "
        f"--frames {rule.frames}, {precision}), {result['prob_view']:.3f} "
        f"(shown view, shift {shift})"
    )
    save_explanation(result, config.out, title=title)
    return {
        "key": config.key,
        "label": label,
        "prob_multiview": result["prob_multiview"],
        "prob_view": result["prob_view"],
        "precision": precision,
        "out": str(config.out),
    }
