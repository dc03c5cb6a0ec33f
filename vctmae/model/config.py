"""Model configuration: one frozen dataclass and the named presets.

The geometry defaults are the paper's (16 frames × 96² pixels, tubes of 2×16×16 → 8×6×6 = 288
tokens); the video presets only change widths and depths. The `mae3d-*` presets are the
paper's Table 3 "3D MAE" baseline: `input_kind="volume"`, the whole 96³ crop in 16³ cubes
(6×6×6 = 216 tokens), one channel, fixed 3-D sin-cos positions, no video weights.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any

# What the model reads from an int16 crop: "clip" — 16 of its sagittal slices, chosen by the
# frame indices (the video ViT); "volume" — the whole crop, frame indices unused (the 3-D MAE).
INPUT_KINDS = ("clip", "volume")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of the ViT, its MAE decoder and its classification head.

    A volume model (`input_kind="volume"`) reuses the clip geometry fields for the whole crop:
    `frames` is the sagittal depth (96), `t_patch` = `patch` the cube side (16), `in_chans` 1,
    and `pred_t_dim` = `frames` (the decoder predicts every voxel of a cube).
    """

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
    input_kind: str = "clip"

    def __post_init__(self) -> None:
        # Every integer field is a count or a size: positive (the decoder may have no blocks).
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "int" and field.name != "decoder_depth" and value <= 0:
                raise ValueError(f"ModelConfig.{field.name} must be positive, got {value}")
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
        if self.input_kind not in INPUT_KINDS:
            raise ValueError(
                f"input_kind must be one of {', '.join(INPUT_KINDS)}, got {self.input_kind!r}"
            )
        if self.volume:
            self._check_volume()

    def _check_volume(self) -> None:
        """A volume model reads a cube in cubic patches, one channel, and predicts whole cubes;
        its sin-cos positions split each width into three even parts (`vit.sincos_positions`)."""
        rules = {
            "frames == img (a cube)": self.frames == self.img,
            "t_patch == patch (cubic patches)": self.t_patch == self.patch,
            "in_chans == 1": self.in_chans == 1,
            "pred_t_dim == frames (whole cubes predicted)": self.pred_t_dim == self.frames,
            "no decoder_cls": not self.decoder_cls,
            "embed_dim and decoder_embed_dim even and >= 6 (sin-cos positions)": all(
                width % 2 == 0 and width >= 6 for width in (self.embed_dim, self.decoder_embed_dim)
            ),
        }
        broken = [rule for rule, holds in rules.items() if not holds]
        if broken:
            raise ValueError(f"a volume model needs {'; '.join(broken)}")

    @property
    def volume(self) -> bool:
        """Whether the model reads the whole crop (the 3-D MAE) rather than a clip of frames."""
        return self.input_kind == "volume"

    def describe(self) -> str:
        """The model's input geometry in words, for messages that must name two models."""
        tokens = self.num_tokens
        if self.volume:
            return (
                f"a 3-D model ({self.frames}×{self.img}×{self.img} volume, {self.patch}³ cubes → "
                f"{tokens} tokens)"
            )
        return (
            f"a video model ({self.frames} frames of {self.img}², "
            f"{self.t_patch}×{self.patch}×{self.patch} tubes → {tokens} tokens)"
        )

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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """The config `to_dict` wrote; ValueError for an unknown or ill-typed field."""
        if not isinstance(values, dict):
            raise ValueError(f"a model config must be a JSON object, got {values!r}")
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {unknown}")
        for name, value in values.items():
            if not _has_type(value, hints[name]):
                raise ValueError(
                    f"ModelConfig.{name} must be of type {hints[name].__name__}, got {value!r}"
                )
        return cls(**values)


def _has_type(value: Any, kind: type) -> bool:
    """Whether a JSON value is of a config field's type (an int is a float; a bool is neither)."""
    if kind is float:
        return type(value) in (int, float)
    return type(value) is kind


# The presets' widths and depths, in this order; the geometry is ModelConfig's (the paper's)
# unless a preset says otherwise.
WIDTH_FIELDS = (
    "embed_dim",
    "depth",
    "num_heads",
    "decoder_embed_dim",
    "decoder_depth",
    "decoder_num_heads",
)


def _preset(widths: tuple[int, ...], **fields: Any) -> ModelConfig:
    return ModelConfig(**dict(zip(WIDTH_FIELDS, widths, strict=True)), **fields)


# The 3-D MAE's geometry: the whole 96³ crop, cubes of 16³ → 6×6×6 = 216 tokens, one channel
# (no RGB replication: nothing video-pretrained to match), whole cubes predicted.
VOLUME_GEOMETRY: dict[str, Any] = {
    "input_kind": "volume",
    "frames": 96,
    "img": 96,
    "t_patch": 16,
    "patch": 16,
    "in_chans": 1,
    "pred_t_dim": 96,
}

# `tiny` normalises its input to (frames − 0.5) / 0.1, i.e. HU / 200: measured on the demo's
# phantoms (plain finetuning loops, 12 epochs of 80 phantoms, NVIDIA H200, fp32), the raw
# [0, 1] frames and mae_st's (x − 0.45) / 0.225 left the model at chance in most seeds, while
# HU / 200 learnt in 8 of 8 (test AUC 0.75–0.95); benchmarks/results/demo_sweep-h200.json.
TINY_INPUT: dict[str, Any] = {"input_mean": 0.5, "input_std": 0.1}

PRESETS: dict[str, ModelConfig] = {
    # Each tuple (WIDTH_FIELDS): encoder width, depth, heads, then decoder width, depth, heads.
    # ViT-L/16 as in the paper (303M encoder parameters; decoder 512 wide, 4 blocks).
    "large": _preset((1024, 24, 16, 512, 4, 16)),
    # ViT-B/16 (86M encoder parameters), with ViT-L's decoder.
    "base": _preset((768, 12, 12, 512, 4, 16)),
    # ViT-S/16 (22M encoder parameters), with a decoder 256 wide, 4 blocks, 8 heads.
    "small": _preset((384, 12, 6, 256, 4, 8)),
    # A small model for CPU demos and tests (192 wide, 4 blocks), trained from scratch.
    "tiny": _preset((192, 4, 3, 128, 2, 4), **TINY_INPUT),
    # Table 3's "3D MAE" (paper App. B.2.4): MAE (He et al. 2022) with 3-D patches and
    # positions, a ViT-B/16³ encoder (86M parameters) and MAE's own decoder (512 wide, 8 blocks).
    "mae3d-base": _preset((768, 12, 12, 512, 8, 16), **VOLUME_GEOMETRY),
    # The 3-D MAE at `tiny`'s widths and input normalisation, for CPU demos and tests.
    "mae3d-tiny": _preset((192, 4, 3, 128, 2, 4), **TINY_INPUT, **VOLUME_GEOMETRY),
}


def preset_config(preset: str = "large", **overrides: Any) -> ModelConfig:
    """The named preset with some fields replaced (e.g. `depth=2` to shrink a test model)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[preset], **overrides)
