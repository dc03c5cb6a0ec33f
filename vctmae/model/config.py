"""Model configuration: one frozen dataclass and the named presets.

The geometry defaults are the paper's (16 frames × 96² pixels, tubes of 2×16×16 → 8×6×6 = 288
tokens); the presets only change widths and depths.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of the video ViT, its MAE decoder and its classification head."""

    embed_dim: int
    depth: int
    num_heads: int
    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int
    mlp_ratio: float = 4.0
    frames: int = 16
    t_patch: int = 2
    patch: int = 16
    img: int = 96
    in_chans: int = 3
    pred_t_dim: int = 8
    norm_pix_loss: bool = False
    qkv_bias: bool = True
    # Decoder cls token: mae_st with cls_embed has one; the Video-CT paper code does not.
    decoder_cls: bool = False
    # Stochastic depth rate of the last block (linearly increasing from 0), as mae_st.
    drop_path: float = 0.0
    # Dropout before the classification head (mae_st models_vit default 0.5).
    head_dropout: float = 0.5
    num_classes: int = 2
    # Input normalisation: the model sees (frames − input_mean) / input_std, where frames are HU
    # clipped to [−1000, 1000] and scaled to [0, 1]. The identity (0, 1) is the paper code's
    # input; mae_st's video models were trained on (x − 0.45) / 0.225. Folded into the patch
    # embedding (weight / std, bias − mean/std · Σweight), so it costs nothing at run time.
    input_mean: float = 0.0
    input_std: float = 1.0

    def __post_init__(self) -> None:
        positive = {
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "decoder_embed_dim": self.decoder_embed_dim,
            "decoder_num_heads": self.decoder_num_heads,
            "frames": self.frames,
            "t_patch": self.t_patch,
            "patch": self.patch,
            "img": self.img,
            "in_chans": self.in_chans,
            "pred_t_dim": self.pred_t_dim,
            "num_classes": self.num_classes,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {value}")
        if self.decoder_depth < 0:
            raise ValueError(f"ModelConfig.decoder_depth must be >= 0, got {self.decoder_depth}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim {self.embed_dim} not divisible by num_heads {self.num_heads}"
            )
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise ValueError(
                f"decoder_embed_dim {self.decoder_embed_dim} not divisible by "
                f"decoder_num_heads {self.decoder_num_heads}"
            )
        if self.frames % self.t_patch:
            raise ValueError(f"frames {self.frames} not divisible by t_patch {self.t_patch}")
        if self.img % self.patch:
            raise ValueError(f"img {self.img} not divisible by patch {self.patch}")
        if (self.t_patch * self.pred_t_dim) % self.frames:
            raise ValueError(
                f"t_patch·pred_t_dim = {self.t_patch * self.pred_t_dim} must be a multiple of "
                f"frames {self.frames} (mae_st's t_pred_patch_size)"
            )
        if (
            not (math.isfinite(self.input_mean) and math.isfinite(self.input_std))
            or self.input_std <= 0
        ):
            raise ValueError(
                f"input_mean must be finite and input_std positive, got {self.input_mean}, {self.input_std}"
            )
        if not 0.0 <= self.drop_path < 1.0 or not 0.0 <= self.head_dropout < 1.0:
            raise ValueError("drop_path and head_dropout must lie in [0, 1)")

    @property
    def grid(self) -> tuple[int, int, int]:
        """Token grid (t, h, w): (8, 6, 6) for the paper's geometry."""
        side = self.img // self.patch
        return (self.frames // self.t_patch, side, side)

    @property
    def num_tokens(self) -> int:
        """Patch tokens per clip (288 for the paper's geometry)."""
        t, h, w = self.grid
        return t * h * w

    @property
    def t_pred_patch(self) -> int:
        """Predicted frames per token (mae_st's t_pred_patch_size; 1 with pred_t_dim = 8)."""
        return self.t_patch * self.pred_t_dim // self.frames

    @property
    def pred_dim(self) -> int:
        """Values predicted per token: t_pred_patch · patch² · in_chans."""
        return self.t_pred_patch * self.patch**2 * self.in_chans

    @property
    def patch_volume(self) -> int:
        """Voxels per one-channel tube (t_patch · patch²; 512 for 2×16×16)."""
        return self.t_patch * self.patch**2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {unknown}")
        return cls(**values)


def vit_large() -> ModelConfig:
    """ViT-L/16 as in the paper (303M encoder parameters; decoder 512 wide, 4 blocks)."""
    return ModelConfig(
        embed_dim=1024,
        depth=24,
        num_heads=16,
        decoder_embed_dim=512,
        decoder_depth=4,
        decoder_num_heads=16,
    )


def vit_base() -> ModelConfig:
    """ViT-B/16 (86M encoder parameters)."""
    return ModelConfig(
        embed_dim=768,
        depth=12,
        num_heads=12,
        decoder_embed_dim=512,
        decoder_depth=4,
        decoder_num_heads=16,
    )


def vit_small() -> ModelConfig:
    """ViT-S/16 (22M encoder parameters)."""
    return ModelConfig(
        embed_dim=384,
        depth=12,
        num_heads=6,
        decoder_embed_dim=256,
        decoder_depth=4,
        decoder_num_heads=8,
    )


def vit_tiny() -> ModelConfig:
    """A small model for CPU demos and tests (192 wide, 4 blocks), trained from scratch.

    Its input is normalised to (frames − 0.5) / 0.1, i.e. HU / 200: measured on the demo's
    phantoms (plain finetuning loops, 12 epochs of 80 phantoms, NVIDIA H200, fp32), the raw
    [0, 1] frames and mae_st's (x − 0.45) / 0.225 left the model at chance in most seeds, while
    HU / 200 learnt in 8 of 8 (test AUC 0.75–0.95); benchmarks/results/demo_sweep-h200.json.
    """
    return ModelConfig(
        embed_dim=192,
        depth=4,
        num_heads=3,
        decoder_embed_dim=128,
        decoder_depth=2,
        decoder_num_heads=4,
        input_mean=0.5,
        input_std=0.1,
    )


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "large": vit_large,
    "base": vit_base,
    "small": vit_small,
    "tiny": vit_tiny,
}


def preset_config(preset: str = "large", **overrides: Any) -> ModelConfig:
    """The named preset with some fields replaced (e.g. `depth=2` to shrink a test model)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[preset](), **overrides)
