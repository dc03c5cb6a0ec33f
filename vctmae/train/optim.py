"""Optimizers of the two trainers (paper App. A.5)."""

from __future__ import annotations

import torch
from torch import nn

# Parameters whose name contains one of these never get weight decay: the
# positional embeddings, the cls and mask tokens (as the MAE code's no_weight_decay list).
_EMBEDDING_NAMES = ("pos_embed", "cls_token", "mask_token")


def no_decay(name: str, param: torch.Tensor) -> bool:
    """Norm weights, biases (all 1-D tensors) and embeddings are not decayed."""
    return param.ndim <= 1 or name.endswith(".bias") or any(k in name for k in _EMBEDDING_NAMES)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed matrices and undecayed norms/biases/embeddings."""
    decay, keep = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (keep if no_decay(name, param) else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": keep, "weight_decay": 0.0},
    ]


def _fused_kwargs(device: torch.device) -> dict:
    # Fused kernels are a CUDA feature; on CPU the default foreach path is used.
    return {"fused": True} if device.type == "cuda" else {}


def build_adamw(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    device: torch.device,
) -> torch.optim.AdamW:
    """Pretraining optimizer: AdamW, decay only on weight matrices."""
    return torch.optim.AdamW(
        param_groups(model, weight_decay), lr=lr, betas=betas, **_fused_kwargs(device)
    )


def build_adam(
    model: nn.Module, *, lr: float, weight_decay: float, device: torch.device
) -> torch.optim.Optimizer:
    """Finetuning optimizer: Adam (the paper's); AdamW-style groups if weight decay is asked for."""
    if weight_decay > 0:
        return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, **_fused_kwargs(device))
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.Adam(params, lr=lr, **_fused_kwargs(device))
