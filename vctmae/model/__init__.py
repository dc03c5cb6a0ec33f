"""vctmae.model: mae_st-compatible video ViT MAE and classifier, weight import/export;
the 3-D MAE baseline of the paper's Table 3 (presets `mae3d-*`)."""

from vctmae.model.checkpoint import (
    CheckpointError,
    LoadReport,
    load_init,
    load_mae_st,
    load_model,
    load_weights,
    save_model,
)
from vctmae.model.config import (
    PRESETS,
    ModelConfig,
    mae3d_base,
    mae3d_tiny,
    preset_config,
    vit_base,
    vit_large,
    vit_small,
    vit_tiny,
)
from vctmae.model.explain import encode_with_attention
from vctmae.model.masking import Masking, random_masking, visible_count
from vctmae.model.vit import (
    MaskedAutoencoder,
    VideoClassifier,
    VideoViT,
    build_classifier,
    build_mae,
    patchify,
    target_frame_indices,
    unpatchify,
)

__all__ = [
    "CheckpointError",
    "LoadReport",
    "encode_with_attention",
    "load_init",
    "load_mae_st",
    "load_model",
    "load_weights",
    "mae3d_base",
    "mae3d_tiny",
    "save_model",
    "PRESETS",
    "Masking",
    "MaskedAutoencoder",
    "ModelConfig",
    "VideoClassifier",
    "VideoViT",
    "build_classifier",
    "build_mae",
    "patchify",
    "preset_config",
    "random_masking",
    "target_frame_indices",
    "unpatchify",
    "visible_count",
    "vit_base",
    "vit_large",
    "vit_small",
    "vit_tiny",
]
