"""Attention probabilities of the encoder, for the attention pictures of explain and predict."""

from __future__ import annotations

import torch

from vctmae.model.vit import VideoViT


def encode_with_attention(
    model: VideoViT, crops: torch.Tensor, frames: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The encoder on crops (B, 96, 96, 96) at frame indices (B, 16), no masking: its output
    (B, 1+L, D) and each block's attention probabilities.

    The maps are one (B, heads, 1+L, 1+L) tensor per block (index 0 is the cls token, then
    tokens t·36 + row·6 + col). Works for the MAE and the classifier alike (a classifier's
    logits are `model.classify(output)`); the blocks' outputs are the same as the SDPA path's.
    Gradients flow unless the caller uses `torch.no_grad()`.
    """
    hidden = model.with_cls(model.embed(crops, frames))  # (B, 1+L, D)
    maps: list[torch.Tensor] = []
    for block in model.blocks:
        hidden, probabilities = block.forward_with_attention(hidden)  # (B, H, 1+L, 1+L)
        maps.append(probabilities)
    return hidden, maps
