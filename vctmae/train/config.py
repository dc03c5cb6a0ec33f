"""Run configurations of the trainers, evaluation and explanation (SPEC §7–§8).

Frozen keyword-only dataclasses filled by the CLI; defaults are the paper's
settings (App. A.5) and, where the paper is silent, its public code's. A value
that cannot be used is a `vctmae.errors.UsageError` (exit 2) naming its flag.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vctmae.errors import UsageError

DEVICES = ("auto", "cpu", "cuda")
LOADERS = ("torch", "dali")
PATCH_EMBED = ("auto", "torch", "triton")
POS_INIT = ("crop", "random", "interpolate")
CLASS_WEIGHTS = ("inverse", "none")


def _check_model(config: Any) -> None:
    """The preset and overrides must make a model (checked here, before any data is read)."""
    from vctmae.model.config import preset_config

    try:
        preset_config(config.model, **config.model_overrides)
    except (TypeError, ValueError) as error:
        raise UsageError(f"--model {config.model}: {error}") from None


def _check_out_folder(out: Path) -> None:
    if Path(out).exists() and not Path(out).is_dir():
        raise UsageError(f"{out}: --out names a file; give a folder for the run's outputs")


def _check_common(config: Any) -> None:
    if not config.shards:
        raise UsageError("shards: give at least one shard path, glob or brace pattern")
    if config.epochs < 1:
        raise UsageError(f"epochs must be >= 1, got {config.epochs}")
    if config.batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {config.batch_size}")
    if config.accum_steps < 1:
        raise UsageError(f"accum_steps must be >= 1, got {config.accum_steps}")
    if config.num_workers < 0:
        raise UsageError(f"workers must be >= 0, got {config.num_workers}")
    if config.warmup_epochs < 0 or config.warmup_epochs > config.epochs:
        raise UsageError(f"warmup_epochs must lie in [0, epochs], got {config.warmup_epochs}")
    if config.grad_clip is not None and config.grad_clip <= 0:
        raise UsageError(f"grad_clip must be positive, got {config.grad_clip}")
    if config.device not in DEVICES:
        raise UsageError(f"device must be one of {DEVICES}, got {config.device!r}")
    if config.loader not in LOADERS:
        raise UsageError(f"loader must be one of {LOADERS}, got {config.loader!r}")
    if config.patch_embed not in PATCH_EMBED:
        raise UsageError(f"patch_embed must be one of {PATCH_EMBED}, got {config.patch_embed!r}")
    if config.pos_init not in POS_INIT:
        raise UsageError(f"pos_init must be one of {POS_INIT}, got {config.pos_init!r}")
    if config.log_every < 1:
        raise UsageError(f"log_every must be >= 1, got {config.log_every}")
    if config.max_steps_per_epoch is not None and config.max_steps_per_epoch < 1:
        raise UsageError("max_steps_per_epoch must be >= 1 or None")
    _check_out_folder(config.out)


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    """MAE pretraining on unlabelled crops (paper App. A.5)."""

    shards: tuple[str, ...]
    out: Path = Path("runs/pretrain")
    model: str = "large"
    model_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {"depth": 2}
    init: Path | None = None  # mae_st / PySlowFast video checkpoint (.pth)
    pos_init: str = "crop"
    epochs: int = 100
    batch_size: int = 8  # per process
    accum_steps: int = 1
    blr: float = 1e-3  # lr = blr * batch_size * world_size * accum_steps / 256
    min_lr: float = 0.0
    warmup_epochs: int = 40
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    mask_ratio: float = 0.8
    grad_clip: float | None = None
    mirror: bool = False
    seed: int = 0
    num_workers: int = 2
    loader: str = "torch"
    device: str = "auto"
    compile: bool = False
    patch_embed: str = "auto"
    resume: bool = False
    log_every: int = 20
    preview: bool = True
    progress: bool = True
    max_steps_per_epoch: int | None = None  # cap for smoke runs and benchmarks

    def __post_init__(self) -> None:
        _check_common(self)
        if not 0.0 < self.mask_ratio < 1.0:
            raise UsageError(f"mask_ratio must lie in (0, 1), got {self.mask_ratio}")
        if self.blr <= 0:
            raise UsageError(f"blr must be positive, got {self.blr}")
        _check_model(self)


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """Fracture classification finetuning (paper App. A.5)."""

    shards: tuple[str, ...]
    val_shards: tuple[str, ...] = ()
    out: Path = Path("runs/finetune")
    model: str = "large"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    init: Path | None = None  # pretraining .safetensors, a video .pth, or None (random)
    pos_init: str = "crop"
    epochs: int = 50
    batch_size: int = 64  # per process
    accum_steps: int = 1
    lr: float = 1e-5
    warmup_epochs: int = 5
    warmup_start_lr: float = 1e-8
    min_lr: float = 1e-7
    weight_decay: float = 0.0  # paper: plain Adam
    class_weights: str = "inverse"
    multiview: int = 6  # views for validation
    patience: int = 40  # epochs without a better validation F1
    dropout: float | None = None  # head dropout; None keeps the model preset's
    grad_clip: float | None = None
    mirror: bool = False
    seed: int = 0
    num_workers: int = 2
    loader: str = "torch"
    device: str = "auto"
    compile: bool = False
    patch_embed: str = "auto"
    resume: bool = False
    log_every: int = 20
    progress: bool = True
    max_steps_per_epoch: int | None = None

    def __post_init__(self) -> None:
        _check_common(self)
        if self.lr <= 0:
            raise UsageError(f"lr must be positive, got {self.lr}")
        if self.multiview not in (1, 6):
            raise UsageError(f"multiview must be 1 or 6, got {self.multiview}")
        if self.class_weights not in CLASS_WEIGHTS:
            raise UsageError(f"class_weights must be one of {CLASS_WEIGHTS}")
        if self.patience < 1:
            raise UsageError(f"patience must be >= 1, got {self.patience}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"dropout must lie in [0, 1), got {self.dropout}")
        _check_model(self)


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Multi-view evaluation of a finetuned classifier."""

    checkpoint: Path
    shards: tuple[str, ...]
    out: Path = Path("report")
    multiview: int = 6
    batch_size: int = 64
    num_workers: int = 2
    loader: str = "torch"
    device: str = "auto"
    patch_embed: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.shards:
            raise UsageError("shards: give at least one shard path, glob or brace pattern")
        if self.multiview not in (1, 6):
            raise UsageError(f"multiview must be 1 or 6, got {self.multiview}")
        if self.device not in DEVICES:
            raise UsageError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.loader not in LOADERS:
            raise UsageError(f"loader must be one of {LOADERS}, got {self.loader!r}")
        if self.batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise UsageError(f"workers must be >= 0, got {self.num_workers}")
        _check_out_folder(self.out)


@dataclass(frozen=True, kw_only=True)
class ExplainConfig:
    """Attention picture of one crop (SPEC §8)."""

    checkpoint: Path
    zarr: Path
    key: str
    out: Path = Path("explain.png")
    offset: int = 3  # which of the six views to show (3 = the middle view, as --multiview 1)
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not 0 <= self.offset < 6:
            raise UsageError(f"offset must lie in [0, 6), got {self.offset}")
        if self.device not in DEVICES:
            raise UsageError(f"device must be one of {DEVICES}, got {self.device!r}")
        if Path(self.out).is_dir():
            raise UsageError(f"{self.out}: --out names a folder; give the PNG file to write")


def config_dict(config: Any) -> dict[str, Any]:
    """JSON-ready view of a config (paths as strings) for logs and checkpoints."""

    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        return value

    return {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


# Settings a resumed run may change: they do not alter data order, schedule or model. The data
# order does not depend on the number of loader workers (vctmae.data.loader), and the device,
# compilation and patch-embedding implementation compute the same model.
RESUMABLE_CHANGES = frozenset(
    {"progress", "log_every", "preview", "num_workers", "resume", "device", "compile"}
    | {"patch_embed", "out"}
)
# Config fields whose command-line flag is not `--` + the field name with dashes.
_FLAGS = {"num_workers": "--workers", "warmup_start_lr": "--warmup-lr"}
_NO_FLAG = {"model_overrides", "betas", "max_steps_per_epoch", "preview"}


def flag_name(field_name: str) -> str:
    """The command-line flag of a config field (or the field's name when it has none)."""
    if field_name in _NO_FLAG:
        return field_name
    return _FLAGS.get(field_name, "--" + field_name.replace("_", "-"))


def _absolute(spec: str) -> str:
    return spec if "://" in spec or spec.startswith("pipe:") else os.path.abspath(spec)


def resume_fingerprint(config: Any) -> dict[str, Any]:
    """The config as `--resume` compares it: shard patterns expanded to the shard files they name
    (so a glob matching new files is a change, and `a*.tar` equals its shell expansion)."""
    from vctmae.data import expand_shards

    values = config_dict(config)
    for name in ("shards", "val_shards"):
        if values.get(name):
            values[name] = [_absolute(path) for path in expand_shards(values[name])]
    if values.get("init") is not None:
        values["init"] = os.path.abspath(values["init"])
    return values


def check_resume_config(saved: dict[str, Any], current: dict[str, Any], *, where: Path) -> None:
    """Refuse to resume the run saved at `where` with settings that change what it computes."""
    changed = [
        name
        for name in sorted(set(saved) | set(current))
        if name not in RESUMABLE_CHANGES and saved.get(name) != current.get(name)
    ]
    if changed:
        details = ", ".join(
            f"{flag_name(name)} {saved.get(name)!r} → {current.get(name)!r}" for name in changed
        )
        raise UsageError(
            f"{where}: --resume with changed settings ({details}); they alter the data order, "
            "schedule or model of the run being resumed — resume with the run's settings, "
            "or start a new run in another --out"
        )
