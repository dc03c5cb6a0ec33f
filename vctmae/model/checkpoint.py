"""Weights in and out: the mae_st / PySlowFast adapter and the project's own safetensors files.

Foreign checkpoints (`load_mae_st`) go through one explicit chain: unwrap (`model_state` /
`model`), rename PySlowFast's decoder keys, fuse `attn.q/k/v` into `attn.qkv`, convert the
positional tables to this model's layout and geometry (central crop of the 14×14 grid for 96²
inputs, paper §3; or bicubic resize; or keep the random init), then load with every shape checked.
Own weights (`save_model` / `load_model`) are safetensors with a JSON config beside them.

Every file is read through one of two readers that turn a damaged or foreign file into a
`CheckpointError` naming it (`read_safetensors`, `load_plain`), and written through
`write_atomically` (temporary name, then rename; a full disk is an `OutOfSpaceError` and leaves
the previous file in place).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as serialize_safetensors
from torch import nn

from vctmae.clip import ClipRule
from vctmae.errors import VctmaeError
from vctmae.files import write_atomically
from vctmae.model.config import ModelConfig
from vctmae.model.vit import MaskedAutoencoder, VideoClassifier, VideoViT

PosInit = Literal["crop", "random", "interpolate"]
POS_INITS = ("crop", "random", "interpolate")
FORMAT = "vctmae-model"
# 2: the weights file's metadata holds the sha256 of the description beside it, and a
# classifier's description may hold the clip rule it was trained with. 1: neither.
FORMAT_VERSION = 2
FORMAT_VERSIONS = (1, 2)


class CheckpointError(VctmaeError, ValueError):
    """A checkpoint that cannot be loaded into the model without being silently wrong."""


@dataclass(frozen=True)
class LoadReport:
    """What a load did, by model (or source, for `unexpected`) key name."""

    loaded: list[str] = field(default_factory=list)  # model keys set from the source
    cropped: list[str] = field(default_factory=list)  # loaded positional tables cropped/resized
    missing: list[str] = field(default_factory=list)  # model keys the source did not provide
    unexpected: list[str] = field(default_factory=list)  # source keys the model has no place for
    reinitialized: list[str] = field(default_factory=list)  # tables kept random (pos_init="random")

    def summary(self) -> str:
        parts = [f"{len(self.loaded)} loaded", f"{len(self.cropped)} cropped/resized"]
        for name in ("missing", "unexpected", "reinitialized"):
            keys = getattr(self, name)
            if keys:
                parts.append(f"{name}: {', '.join(keys)}")
        return "; ".join(parts)


# ----------------------------------------------------------------------------------------------
# Files in and out


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; a missing, truncated or foreign file is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return load_file(str(path))
    except SafetensorError as error:
        reason = str(error).removeprefix("Error while deserializing header: ")
        raise CheckpointError(
            f"{path}: not a readable .safetensors file ({reason}); truncated or not weights"
        ) from None


# How a torch file starts: a zip archive (torch.save since 1.6), or a pickle's protocol opcode
# (protocol ≥ 2, the legacy format of older PySlowFast checkpoints).
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")


def _looks_like_torch_file(path: Path) -> bool:
    """Whether the file starts like a torch file (perhaps truncated); not text or another format."""
    with open(path, "rb") as handle:
        return handle.read(4).startswith(_TORCH_MAGIC)


# The classes, beyond tensors and plain values, that the published video checkpoints hold and
# `weights_only` may rebuild: mae_st's training files (`util/misc.py: save_model`) store
# {"model", "optimizer", "epoch", "scaler", "args"} with `args` an argparse.Namespace (a plain
# attribute bag: rebuilding one runs no code of the file). PySlowFast's `.pyth` files
# ({"epoch", "model_state", "optimizer_state", "cfg"}, cfg a YAML string) need nothing more.
# Every other class stays refused.
SAFE_GLOBALS = (argparse.Namespace,)

# What decoding a damaged torch file raises: the zip reader (RuntimeError), an empty or cut file
# (EOFError), or the weights-only unpickler running on bytes that are not a pickle (the rest).
_DAMAGED = (RuntimeError, EOFError, KeyError, IndexError, TypeError, ValueError, AttributeError)


def load_plain(path: str | Path, what: str = "PyTorch checkpoint") -> Any:
    """`torch.load(weights_only=True)` of a file: tensors and plain values (and the benign
    `SAFE_GLOBALS`: mae_st's argparse.Namespace) only, never pickled code.

    A file holding other objects is refused in our own words (PyTorch's message suggests retrying
    with `weights_only=False`, which would run the file's code); an unreadable one is named.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such {what}")
    if not _looks_like_torch_file(path):
        raise CheckpointError(f"{path}: not a {what} (neither a zip archive nor a pickle)")
    try:
        # weights_only: a downloaded pickle can never run code here.
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        blocked = [line.strip() for line in str(error).splitlines() if "GLOBAL" in line]
        detail = f" ({blocked[0]})" if blocked else ""
        raise CheckpointError(
            f"{path}: refused — not a {what} of tensors and plain values{detail}; "
            "vctmae never runs code stored in a checkpoint"
        ) from None
    except _DAMAGED as error:
        reason = str(error).strip().split(". ")[0].splitlines()[0] if str(error).strip() else ""
        raise CheckpointError(
            f"{path}: not a readable {what} ({type(error).__name__}{': ' if reason else ''}"
            f"{reason[:120]}); truncated or damaged"
        ) from None


# ----------------------------------------------------------------------------------------------
# Reading and renaming


def read_state(source: str | Path | Mapping[str, object]) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint path (.pth via weights_only torch.load, or .safetensors) or a dict,
    unwrapped from a `model_state` / `model` entry and from DDP's `module.` prefix."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.suffix == ".safetensors":
            state: Mapping[str, object] = read_safetensors(path)
        else:
            state = load_plain(path)
    else:
        path, state = None, source
    where = f"{path}: " if path is not None else ""
    if not isinstance(state, Mapping):
        raise CheckpointError(
            f"{where}checkpoint is a {type(state).__name__}, not a dict of tensors"
        )
    for wrapper in ("model_state", "model"):
        if isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
            break
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{where}{key}: not a tensor ({type(value).__name__}); unknown layout"
            )
        # DDP's `module.` and torch.compile's `_orig_mod.` wrappers are not part of the layout.
        tensors[key.removeprefix("module.").removeprefix("_orig_mod.")] = value
    return tensors


def rename_pyslowfast(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PySlowFast decoder names → mae_st: `pred_head.transforms.0.{i}` are the decoder blocks and
    the one index holding only weight/bias (4 for a 4-block decoder) the decoder norm;
    `pred_head.projections.0` is the decoder prediction layer."""
    blocks_prefix, projection_prefix = "pred_head.transforms.0.", "pred_head.projections.0."
    fields_by_index: dict[str, set[str]] = {}
    for key in state:
        if key.startswith(blocks_prefix):
            index, _, rest = key[len(blocks_prefix) :].partition(".")
            fields_by_index.setdefault(index, set()).add(rest)
    norm_indices = [i for i, rest in fields_by_index.items() if rest <= {"weight", "bias"}]
    if len(norm_indices) > 1:
        raise CheckpointError(
            f"pred_head.transforms.0.{{{','.join(sorted(norm_indices))}}}: several candidates "
            "for the decoder norm"
        )
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(blocks_prefix):
            index, _, rest = key[len(blocks_prefix) :].partition(".")
            key = (
                f"decoder_norm.{rest}"
                if index in norm_indices
                else f"decoder_blocks.{index}.{rest}"
            )
        elif key.startswith(projection_prefix):
            key = "decoder_pred." + key[len(projection_prefix) :]
        renamed[key] = value
    return renamed


def fuse_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mae_st's separate `attn.q`, `attn.k`, `attn.v` → one `attn.qkv` (rows [q; k; v])."""
    fused = dict(state)
    for key in state:
        if not key.endswith(".attn.q.weight"):
            continue
        base = key[: -len("q.weight")]
        for kind in ("weight", "bias"):
            parts = [f"{base}{name}.{kind}" for name in ("q", "k", "v")]
            if all(part in state for part in parts):
                fused[f"{base}qkv.{kind}"] = torch.cat([state[part] for part in parts], dim=0)
                for part in parts:
                    del fused[part]
    return fused


# ----------------------------------------------------------------------------------------------
# Positional tables


def resize_spatial(table: torch.Tensor, side: int, how: PosInit, key: str) -> torch.Tensor:
    """Spatial positions (..., S, C) on a square grid → (..., side², C): the central side×side
    block ('crop', paper §3: 14×14 → 6×6 keeps rows/cols 4…9) or a bicubic resize ('interpolate')."""
    *lead, positions, channels = table.shape
    source_side = math.isqrt(positions)
    if source_side * source_side != positions:
        raise CheckpointError(f"{key}: {positions} spatial positions do not form a square grid")
    if source_side == side:
        return table
    grid = table.reshape(-1, source_side, source_side, channels)  # (N, s, s, C)
    if how == "crop":
        if source_side < side:
            raise CheckpointError(
                f"{key}: cannot crop a {source_side}×{source_side} grid to {side}×{side}; "
                "use pos_init='interpolate'"
            )
        start = (source_side - side) // 2
        grid = grid[:, start : start + side, start : start + side, :]  # (N, side, side, C)
    else:
        resized = F.interpolate(
            grid.permute(0, 3, 1, 2).float(), size=(side, side), mode="bicubic", align_corners=False
        )  # (N, C, side, side)
        grid = resized.permute(0, 2, 3, 1).to(table.dtype)  # (N, side, side, C)
    return grid.reshape(*lead, side * side, channels)


def _decoder_table(
    state: dict[str, torch.Tensor], frames: int
) -> tuple[torch.Tensor | None, torch.Tensor, list[str]] | None:
    """The source decoder positions as (cls row (1, 1, C) or None, grid (1, T, S, C), source keys)."""
    if "decoder_pos_embed" in state:
        table = state["decoder_pos_embed"]
        _, rows, channels = table.shape
        for has_cls in (False, True):
            per_frame, remainder = divmod(rows - int(has_cls), frames)
            if remainder == 0 and math.isqrt(per_frame) ** 2 == per_frame:
                cls = table[:, :1] if has_cls else None
                grid = table[:, int(has_cls) :].reshape(1, frames, per_frame, channels)
                return cls, grid, ["decoder_pos_embed"]
        raise CheckpointError(
            f"decoder_pos_embed: shape {tuple(table.shape)} is not [cls +] {frames} frames × a "
            "square grid"
        )
    if "decoder_pos_embed_spatial" in state and "decoder_pos_embed_temporal" in state:
        spatial = state["decoder_pos_embed_spatial"]  # (1, S, C)
        temporal = state["decoder_pos_embed_temporal"]  # (1, T, C)
        if temporal.shape[1] != frames:
            raise CheckpointError(
                f"decoder_pos_embed_temporal: source shape {tuple(temporal.shape)} has "
                f"{temporal.shape[1]} temporal positions; the model has {frames}"
            )
        grid = spatial[:, None, :, :] + temporal[:, :, None, :]  # (1, T, S, C), as mae_st sums them
        keys = ["decoder_pos_embed_spatial", "decoder_pos_embed_temporal"]
        cls = state.get("decoder_pos_embed_class")
        if cls is not None:
            keys.append("decoder_pos_embed_class")
        return cls, grid, keys
    return None


def convert_positions(
    state: dict[str, torch.Tensor], model: VideoViT, pos_init: PosInit
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Bring the source positional tables to the model's layout and grid.

    Returns (state, keys cropped or resized, keys left at their random init).
    """
    config: ModelConfig = model.config
    frames, side, _ = config.grid
    state = dict(state)
    cropped: list[str] = []
    reinitialized: list[str] = []

    if "pos_embed" in state:
        raise CheckpointError(
            f"pos_embed: source shape {tuple(state['pos_embed'].shape)} is a joint space-time "
            f"table; the model has separable pos_embed_spatial "
            f"{tuple(model.pos_embed_spatial.shape)} + pos_embed_temporal "
            f"{tuple(model.pos_embed_temporal.shape)} (mae_st sep_pos_embed=True), which it "
            "cannot be split into"
        )
    if "pos_embed_spatial" in state:
        key = "pos_embed_spatial"
        if pos_init == "random":
            del state[key]
            reinitialized.append(key)
        elif state[key].shape[1] != side * side:
            state[key] = resize_spatial(state[key], side, pos_init, key)
            cropped.append(key)

    if isinstance(model, MaskedAutoencoder):
        source = _decoder_table(state, frames)
        if source is not None:
            cls, grid, source_keys = source
            for source_key in source_keys:
                del state[source_key]
            key = "decoder_pos_embed"
            if pos_init == "random":
                reinitialized.append(key)
            else:
                resized = grid.shape[2] != side * side
                grid = resize_spatial(grid, side, pos_init, key)  # (1, T, side², C)
                table = grid.reshape(1, frames * side * side, grid.shape[-1])  # (1, L, C)
                if config.decoder_cls:
                    if cls is None:
                        raise CheckpointError(
                            f"{key}: the model has a decoder cls position; the source "
                            f"{'/'.join(source_keys)} has none"
                        )
                    table = torch.cat([cls, table], dim=1)  # (1, 1+L, C)
                elif cls is not None:
                    resized = True  # the leading cls row is dropped (no decoder cls token here)
                state[key] = table
                if resized:
                    cropped.append(key)
    return state, cropped, reinitialized


# ----------------------------------------------------------------------------------------------
# Loading into a model


def _load_checked(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    *,
    cropped: list[str] | None = None,
    reinitialized: list[str] | None = None,
) -> LoadReport:
    """Load the keys the model has, refusing any shape mismatch; report the rest by name."""
    target = model.state_dict()
    usable: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in state.items():
        if key not in target:
            unexpected.append(key)
            continue
        if tuple(value.shape) != tuple(target[key].shape):
            raise CheckpointError(
                f"{key}: checkpoint shape {tuple(value.shape)} does not fit model shape "
                f"{tuple(target[key].shape)}"
            )
        usable[key] = value.to(target[key].dtype)
    model.load_state_dict(usable, strict=False)
    reinitialized = list(reinitialized or [])
    return LoadReport(
        loaded=sorted(usable),
        cropped=sorted(cropped or []),
        missing=[key for key in target if key not in usable and key not in reinitialized],
        unexpected=sorted(unexpected),
        reinitialized=reinitialized,
    )


def load_mae_st(
    source: str | Path | Mapping[str, object], model: VideoViT, pos_init: PosInit = "crop"
) -> LoadReport:
    """Load an mae_st / PySlowFast checkpoint (path or state dict) into an MAE or a classifier.

    pos_init: 'crop' (central block of the source grid, paper §3), 'interpolate' (bicubic) or
    'random' (keep this model's initial positional tables).
    """
    if pos_init not in POS_INITS:
        raise ValueError(f"pos_init must be one of {POS_INITS}, got {pos_init!r}")
    if model.config.volume:
        where = f"{source}: " if isinstance(source, str | Path) else ""
        raise CheckpointError(
            f"{where}a video checkpoint (mae_st / PySlowFast, 2×16×16 tubes of RGB frames) "
            f"cannot initialise {model.config.describe()}; the 3-D MAE starts from random "
            "weights or from its own pretraining's model.safetensors"
        )
    state = fuse_qkv(rename_pyslowfast(read_state(source)))
    state, cropped, reinitialized = convert_positions(state, model, pos_init)
    with torch.no_grad():
        return _load_checked(model, state, cropped=cropped, reinitialized=reinitialized)


def load_weights(
    model: VideoViT, source: str | Path | Mapping[str, object], *, strict: bool = False
) -> LoadReport:
    """Load this project's weights (safetensors path or state dict) into `model` by name.

    The one way weights of this project enter a model. Shapes must match; `strict` also refuses
    a missing or an unexpected key (resuming, `load_model`). Not strict, e.g. an MAE file into a
    classifier loads the encoder and reports `head.*` missing and the decoder unexpected.
    """
    with torch.no_grad():
        report = _load_checked(model, read_state(source))
    if strict and (report.missing or report.unexpected):
        where = f"{source}: " if isinstance(source, str | Path) else ""
        raise CheckpointError(f"{where}weights do not fit this model ({report.summary()})")
    return report


def load_init(model: VideoViT, path: str | Path, pos_init: PosInit = "crop") -> LoadReport:
    """Starting weights for training (`--init`): a vctmae `.safetensors` or a video `.pth`.

    A `.safetensors` file (e.g. pretraining's `model.safetensors` for a classifier) must supply
    every weight but the head, in the same shapes, and come from a model that reads the same
    input (clip or volume) normalised the same way (its config beside it says); anything else is
    refused. A `.pth` is an mae_st / PySlowFast Kinetics checkpoint (`load_mae_st`, positional
    tables by `pos_init`), which a volume model refuses.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: --init checkpoint not found")
    if path.suffix != ".safetensors":
        return load_mae_st(path, model, pos_init=pos_init)
    if config_path(path).is_file():
        _, source = read_model_config(path)
        ours = model.config
        if source.volume != ours.volume:
            raise CheckpointError(
                f"{path}: weights of {source.describe()} cannot initialise "
                f"{ours.describe()}; use the --model preset of the run that wrote them"
            )
        if (source.input_mean, source.input_std) != (ours.input_mean, ours.input_std):
            raise CheckpointError(
                f"{path}: pretrained on inputs normalised with mean {source.input_mean}, "
                f"std {source.input_std}, but this model uses mean {ours.input_mean}, "
                f"std {ours.input_std}; train with the same model settings as before"
            )
    report = load_weights(model, path)
    # The classifier's head is what an MAE's weights cannot provide.
    missing = [key for key in report.missing if not key.startswith("head.")]
    if missing:
        raise CheckpointError(
            f"{path}: not an encoder of this model — missing {missing[:5]} "
            "(same --model preset as the run that wrote it?)"
        )
    return report


# ----------------------------------------------------------------------------------------------
# Own weights: safetensors + JSON config


def config_path(path: str | Path) -> Path:
    """The JSON config beside a weights file: `model.safetensors` → `model.json`."""
    return Path(path).with_suffix(".json")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


@dataclass(frozen=True)
class ModelFiles:
    """What `save_model` writes, taken from a model: its tensors (on the CPU) and description."""

    tensors: dict[str, torch.Tensor]
    description: dict[str, object]


def model_files(model: VideoViT, *, clip: ClipRule | None = None) -> ModelFiles:
    """A copy of `model`'s weights on the CPU and its description, ready to write (also from
    another thread while training goes on: nothing here refers to the live parameters).

    clip: the rule a classifier was trained and validated with, recorded in its description so
    that eval, explain and predict apply it by default.
    """
    model = unwrap(model)
    if not isinstance(model, (MaskedAutoencoder, VideoClassifier)):
        raise TypeError(f"not a vctmae model: {type(model).__name__}")
    tensors = {
        key: value.detach().to("cpu", copy=True).contiguous()
        for key, value in model.state_dict().items()
    }
    description: dict[str, object] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "kind": "mae" if isinstance(model, MaskedAutoencoder) else "classifier",
        "config": model.config.to_dict(),
    }
    if clip is not None:
        description["clip"] = clip.to_json()
    return ModelFiles(tensors=tensors, description=description)


def description_digest(description: Mapping[str, object]) -> str:
    """sha256 of a model description in a canonical JSON form (sorted keys, no spaces)."""
    text = json.dumps(description, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# The weights file's metadata key that pairs it with its description.
DIGEST_KEY = "description_sha256"


def write_model(files: ModelFiles, path: str | Path) -> Path:
    """Write weights (safetensors at `path`) and config (`config_path(path)`), each atomically
    (config first, then weights): a crash or a full disk never leaves a half-written file.

    The weights' metadata holds the digest of the description, so a description edited or
    swapped afterwards is refused when the weights are loaded (`read_model_description`).
    """
    path = Path(path)
    text = (json.dumps(files.description, indent=2) + "\n").encode()
    write_atomically(config_path(path), text)
    metadata = {"format": FORMAT, DIGEST_KEY: description_digest(files.description)}
    data = serialize_safetensors(files.tensors, metadata=metadata)
    write_atomically(path, data)
    return path


def save_model(model: VideoViT, path: str | Path, *, clip: ClipRule | None = None) -> Path:
    """Write the weights as safetensors at `path` and the config at `config_path(path)`."""
    return write_model(model_files(model, clip=clip), path)


@dataclass(frozen=True, kw_only=True)
class ModelDescription:
    """What the JSON beside a weights file says: the model kind, its config, and (classifiers
    from finetuning) the clip rule it was trained with."""

    kind: str
    config: ModelConfig
    clip: ClipRule | None = None


def _weights_digest(path: Path) -> str | None:
    """The description digest in a weights file's metadata (None when it has none)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise CheckpointError(
            f"{path}: not a readable .safetensors file ({error}); truncated or not weights"
        ) from None
    return metadata.get(DIGEST_KEY)


def read_model_description(path: str | Path) -> ModelDescription:
    """The description recorded beside a weights file; a missing, damaged, unknown or edited one
    (its digest no longer that of the weights' metadata) is a CheckpointError naming it."""
    path = Path(path)
    description_path = config_path(path)
    if not description_path.is_file():
        raise CheckpointError(f"{description_path}: config file missing beside {path.name}")
    try:
        description = json.loads(description_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{description_path}: not a {FORMAT} config ({error})") from None
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        raise CheckpointError(f"{description_path}: not a {FORMAT} config")
    version = description.get("version")
    if type(version) is not int or version not in FORMAT_VERSIONS:
        raise CheckpointError(
            f"{description_path}: format version {version!r} is not one this vctmae reads "
            f"({', '.join(map(str, FORMAT_VERSIONS))}); a newer vctmae wrote it?"
        )
    if version >= 2 and path.is_file():
        recorded = _weights_digest(path)
        if recorded != description_digest(description):
            raise CheckpointError(
                f"{description_path}: does not describe the weights in {path.name} (its digest "
                "differs from the one the weights were saved with): edited or from another "
                "model; use the description written with the weights"
            )
    kind = description.get("kind")
    if kind not in ("mae", "classifier"):
        raise CheckpointError(f"{description_path}: unknown model kind {kind!r}")
    try:
        config = ModelConfig.from_dict(description.get("config", {}))
        clip = description.get("clip")
        rule = None if clip is None else ClipRule.from_json(clip)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{description_path}: {error}") from None
    return ModelDescription(kind=kind, config=config, clip=rule)


def read_model_config(path: str | Path) -> tuple[str, ModelConfig]:
    """(kind, config) recorded beside a weights file (`read_model_description`)."""
    description = read_model_description(path)
    return description.kind, description.config


def load_model(path: str | Path, *, device: torch.device | str = "cpu") -> VideoViT:
    """Rebuild the model saved by `save_model` and load its weights strictly."""
    kind, config = read_model_config(path)
    model: VideoViT = MaskedAutoencoder(config) if kind == "mae" else VideoClassifier(config)
    load_weights(model, path, strict=True)
    return model.to(device)


def load_classifier(path: str | Path, *, device: torch.device | str = "cpu") -> VideoClassifier:
    """`load_model` for commands that need a classifier (eval, explain): an MAE file is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    kind, _ = read_model_config(path)
    if kind != "classifier":
        raise CheckpointError(
            f"{path}: a pretraining (MAE) checkpoint ({config_path(path).name} says kind "
            f"'{kind}'), not a classifier; finetune it first (vctmae finetune --init {path})"
        )
    return load_model(path, device=device)
