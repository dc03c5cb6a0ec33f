"""vctmae.model: mae_st-compatible video ViT MAE and classifier, weight import/export;
the 3-D MAE baseline of the paper's Table 3 (presets `mae3d-*`)."""

from vctmae.model.checkpoint import (
    CheckpointError,
    load_init,
    load_mae_st,
    load_model,
    load_weights,
    save_model,
)
from vctmae.model.config import ModelConfig, preset_config
from vctmae.model.masking import random_masking, visible_count
from vctmae.model.vit import (
    MaskedAutoencoder,
    build_classifier,
    build_mae,
    encode_with_attention,
    patchify,
    target_frame_indices,
    unpatchify,
)

__all__ = [
    "CheckpointError",
    "MaskedAutoencoder",
    "ModelConfig",
    "encode_with_attention",
    "build_classifier",
    "build_mae",
    "load_init",
    "load_mae_st",
    "load_model",
    "load_weights",
    "patchify",
    "preset_config",
    "random_masking",
    "save_model",
    "target_frame_indices",
    "unpatchify",
    "visible_count",
]
