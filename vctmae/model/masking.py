"""MAE random masking as pure functions (per-sample shuffling by argsort of noise, as mae_st)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Masking:
    """One masking draw for a batch.

    ids_keep:    (B, K) int64 token indices the encoder sees, in shuffled order.
    ids_restore: (B, L) int64 permutation that puts [visible..., masked...] back in token order.
    mask:        (B, L) float, 0 = visible, 1 = masked (mae_st's convention).
    """

    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor


def visible_count(num_tokens: int, mask_ratio: float) -> int:
    """Tokens kept per sample: int(L·(1 − ratio)), e.g. 57 of 288 at 0.8 (mae_st's rounding)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must lie in [0, 1), got {mask_ratio}")
    return int(num_tokens * (1 - mask_ratio))


def random_masking(noise: torch.Tensor, mask_ratio: float) -> Masking:
    """Keep the tokens with the smallest noise (B, L); the rest are masked."""
    batch_size, num_tokens = noise.shape
    keep = visible_count(num_tokens, mask_ratio)
    ids_shuffle = torch.argsort(noise, dim=1)  # (B, L) ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (B, L)
    ids_keep = ids_shuffle[:, :keep]  # (B, K)
    mask = torch.ones(batch_size, num_tokens, device=noise.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # (B, L) back in token order
    return Masking(ids_keep=ids_keep, ids_restore=ids_restore, mask=mask)


def gather_tokens(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """tokens (B, L, D), ids (B, K) → (B, K, D)."""
    return torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
