"""Attention pictures of the classifier over the 16 frames of a crop (SPEC §8).

Two maps per crop, both over the 8 × 6 × 6 token grid:
- last layer: the last block's attention probabilities, mean over heads, then
  mean over the patch-token queries of the attention each patch token receives.
  The classifier pools the mean of the patch tokens (not the cls token), so the
  mean over patch queries — not the cls row — is what feeds its decision.
- rollout (Abnar & Zuidema 2020): per layer the head-mean attention plus the
  identity (the residual path), rows renormalised, multiplied through all
  layers; then the same mean over patch queries.
Each token covers 2 frames × 16 × 16 pixels, so a map is upsampled to
16 × 96 × 96 by repetition and overlaid on the view's sagittal slices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from vctmae.model.config import ModelConfig
from vctmae.train.config import ExplainConfig


def refuse_volume(model: ModelConfig, who: str) -> None:
    """The pictures here are drawn over a video model's 16 frames; a 3-D model has none."""
    if model.volume:
        from vctmae.errors import UsageError

        raise UsageError(
            f"{who}: attention pictures are drawn over a video model's 16 frames; this is "
            f"{model.describe()} (in predict, pass --no-attention)"
        )


def rollout(maps: list[torch.Tensor]) -> torch.Tensor:
    """Attention rollout of one sample: maps are per layer (heads, N, N) → (N, N)."""
    tokens = maps[0].shape[-1]
    identity = torch.eye(tokens, dtype=torch.float64)
    result = identity
    for layer in maps:
        attention = 0.5 * layer.double().mean(0) + 0.5 * identity  # (N, N)
        attention = attention / attention.sum(-1, keepdim=True)
        result = attention @ result
    return result


def token_scores(maps: list[torch.Tensor], grid: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    """Per-token relevance (t, h, w) from one sample's attention maps (cls token first)."""
    last = maps[-1].double().mean(0)  # (N, N) mean over heads
    rolled = rollout(maps)
    scores = {}
    for name, matrix in (("last layer", last), ("rollout", rolled)):
        received = matrix[1:, 1:].mean(0)  # (L,) mean over patch queries of attention to patch keys
        scores[name] = received.reshape(grid).float()  # (t, h, w)
    return scores


def to_frames(scores: torch.Tensor, t_patch: int = 2, patch: int = 16) -> torch.Tensor:
    """(t, h, w) token scores → (t·t_patch, h·patch, w·patch), scaled to [0, 1]."""
    frames = (
        scores.repeat_interleave(t_patch, 0).repeat_interleave(patch, 1).repeat_interleave(patch, 2)
    )
    low, high = frames.min(), frames.max()
    return (frames - low) / (high - low) if high > low else torch.zeros_like(frames)


@torch.no_grad()
def attention_frames(
    model: torch.nn.Module, crop: np.ndarray, *, offset: int = 3
) -> dict[str, torch.Tensor | dict[str, torch.Tensor]]:
    """The frames of one view of an int16 crop (96, 96, 96) and the attention maps over them.

    Returns `frames` (16, 96, 96) in [0, 1] and `maps` {"last layer", "rollout"}, each
    (16, 96, 96) scaled to [0, 1]; one forward pass (`vctmae predict` draws these for
    every vertebra, with probabilities it has already computed).
    """
    from vctmae.data import offset_frames, sample_frames
    from vctmae.model import attention_maps

    model.eval()
    device = next(model.parameters()).device
    crops = torch.from_numpy(np.ascontiguousarray(crop)).to(device)[None]  # (1, 96, 96, 96)
    view = torch.full((1,), offset, dtype=torch.long, device=device)
    clip = sample_frames(crops, view)  # (1, 1, 16, 96, 96)
    # Per layer (heads, N, N).
    maps = [m[0].cpu() for m in attention_maps(model, crops, offset_frames(view))]
    cfg = model.config
    scores = token_scores(maps, cfg.grid)
    return {
        "frames": clip[0, 0].cpu(),  # (16, 96, 96)
        "maps": {name: to_frames(s, cfg.t_patch, cfg.patch) for name, s in scores.items()},
    }


@torch.no_grad()
def explain_crop(model: torch.nn.Module, crop: np.ndarray, *, offset: int = 3) -> dict[str, Any]:
    """Probabilities and frame-level attention maps of one int16 crop (96, 96, 96)."""
    from vctmae.data import multiview_offsets, offset_frames

    model.eval()
    device = next(model.parameters()).device
    crops = torch.from_numpy(np.ascontiguousarray(crop)).to(device)[None]  # (1, 96, 96, 96)
    views = multiview_offsets(6)
    probs = [
        torch.softmax(model(crops, offset_frames(torch.tensor([o], device=device))).float(), -1)[
            0, 1
        ]
        for o in views
    ]
    return {
        **attention_frames(model, crop, offset=offset),
        "prob_view": float(probs[views.index(offset)]),
        "prob_multiview": float(torch.stack(probs).mean()),
    }


def save_explanation(result: dict[str, Any], path: Path, *, title: str) -> Path:
    """Two blocks of 2 × 8 panels (last layer, rollout), each frame with its attention overlay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = result["frames"].numpy()
    names = list(result["maps"])
    columns = frames.shape[0] // 2
    fig, axes = plt.subplots(
        2 * len(names), columns, figsize=(1.5 * columns, 1.65 * 2 * len(names))
    )
    for block, name in enumerate(names):
        heat = result["maps"][name].numpy()
        for k in range(frames.shape[0]):
            ax = axes[2 * block + k // columns, k % columns]
            ax.imshow(frames[k], cmap="gray", vmin=0, vmax=1)
            ax.imshow(heat[k], cmap="jet", alpha=0.35, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"frame {k}", fontsize=7)
            if k % columns == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    from vctmae.model.checkpoint import write_atomically

    # Atomically (a full disk keeps an earlier picture intact, and leaves no partial PNG).
    path = write_atomically(path, lambda handle: fig.savefig(handle, format="png", dpi=90))
    plt.close(fig)
    return path


def run_explain(config: ExplainConfig) -> dict[str, Any]:
    """Write the attention picture of `config.key`; returns its probabilities and path."""
    from vctmae.data import ZarrCrops
    from vctmae.data.zarr_store import MissingKeyError, ZarrStoreError
    from vctmae.model.checkpoint import load_classifier

    model = load_classifier(config.checkpoint)
    refuse_volume(model.config, str(config.checkpoint))
    if not Path(config.zarr).exists():
        raise ZarrStoreError(f"{config.zarr}: Zarr store not found")
    store = ZarrCrops(config.zarr)
    if config.key not in store:
        raise MissingKeyError(
            f"{config.zarr}: no crop with key {config.key!r} ({len(store.keys)} keys)"
        )
    model = model.to(torch.device(config.device))
    result = explain_crop(model, store.crop(config.key), offset=config.offset)
    label = store.label(config.key)
    truth = {0: "no fracture", 1: "fracture"}.get(label, "unlabelled")
    title = (
        f"{config.key} ({truth}): P(fracture) = {result['prob_multiview']:.3f} (6 views), "
        f"{result['prob_view']:.3f} (shown view, offset {config.offset})"
    )
    save_explanation(result, config.out, title=title)
    return {
        "key": config.key,
        "label": label,
        "prob_multiview": result["prob_multiview"],
        "prob_view": result["prob_view"],
        "out": str(config.out),
    }
