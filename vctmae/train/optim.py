"""Optimizers of the two trainers (paper App. A.5).

Pretraining: AdamW, β (0.9, 0.95), weight decay 0.05 on the weight matrices only — norms,
biases, the positional embeddings and the cls/mask tokens undecayed (as the MAE repositories'
`no_weight_decay` lists). The paper's public code differs here: it calls mae_st's
`add_weight_decay` without a skip list, which exempts only 1-D tensors and `.bias` names, so
its positional embeddings and cls/mask tokens (all >= 2-D) *are* decayed with 0.05.
Finetuning: plain Adam with no weight decay on any parameter, as the public code
(`torch.optim.Adam(model.parameters(), lr=1e-5)`; its model's `no_weight_decay()` set is
never used). See docs/reference-code-notes.md §9.
"""

from __future__ import annotations

import torch
from torch import nn

# Parameters whose name contains one of these never get weight decay: the
# positional embeddings, the cls and mask tokens (as the MAE repositories' no_weight_decay
# lists; the paper's public code decays them, see the module docstring).
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


def _kwargs(lr: float, device: torch.device, capture_ready: bool) -> dict:
    """Fused kernels on CUDA (the default foreach path on CPU). A capture-ready optimizer
    (`vctmae.train.graph`) keeps its learning rate in a device tensor the step updates in place,
    and on CUDA keeps its step counters on the device (`capturable`), so a CUDA graph can replay
    it; on the CPU it is the fused kernel with a tensor lr, the same arithmetic."""
    if not capture_ready:
        return {"lr": lr, "fused": True} if device.type == "cuda" else {"lr": lr}
    return {
        "lr": torch.tensor(lr, dtype=torch.float32, device=device),
        "fused": True,
        "capturable": device.type == "cuda",
    }


OPTIMIZERS = ("adamw", "adam")


def build_optimizer(
    model: nn.Module,
    kind: str,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    device: torch.device,
    capture_ready: bool = False,
) -> torch.optim.Optimizer:
    """The trainers' optimizers (paper App. A.5), fused on CUDA (see `_kwargs`).

    "adamw" (pretraining): AdamW with decay only on weight matrices (`param_groups`).
    "adam" (finetuning): the paper's plain Adam; AdamW-style groups if weight decay is asked for.
    """
    if kind not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {kind!r}")
    if kind == "adamw" or weight_decay > 0:
        groups = param_groups(model, weight_decay)
        return torch.optim.AdamW(groups, betas=betas, **_kwargs(lr, device, capture_ready))
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.Adam(params, betas=betas, **_kwargs(lr, device, capture_ready))
