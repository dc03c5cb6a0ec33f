"""Run configurations of the trainers.

Frozen keyword-only dataclasses; defaults are the paper's settings (App. A.5)
and, where the paper is silent, its public code's. Each field that is a
command-line option says so with `vctmae.flags.flag` (flag, help, default in one
place; `vctmae.cli.train` derives the commands from these classes). A value
that cannot be used is a `vctmae.errors.UsageError` (exit 2) naming its flag.

`RunOptions` holds what both trainers share (data, model, seed, loader, device,
speed, logging, resume); `PretrainConfig` and `FinetuneConfig` add only their
optimiser, schedule and loss settings on top. The options inference shares with
them (device, speed, the clip-rule help and checks) live in `vctmae.infer.config`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from vctmae.clip import FLIPS, FRAME_MODES, REFERENCE_LEVELS
from vctmae.data.options import LoaderOptions
from vctmae.errors import UsageError
from vctmae.flags import config_fields, flag, refuse_changed_settings
from vctmae.infer.config import (
    COMBINE_HELP,
    DEVICE_HELP,
    DEVICES,
    FRAMES_HELP,
    MULTIVIEW_HELP,
    SHARDS_HELP,
    SpeedOptions,
    check_out_folder,
    check_rule_options,
    check_shards,
    one_of,
    plain,
    refuse_frame_options,
)

# Frame sizes: the paper's 96² format, or the video format 224² (Table 2 row 5).
FRAME_SIZES = (96, 224)
POS_INIT = ("crop", "random", "interpolate")
CLASS_WEIGHTS = ("inverse", "none")

# Seeds are used as given by numpy and torch generators (which take 64-bit seeds, and the per-rank
# stream multiplies the seed by 1000): the usual 32-bit range leaves room for both.
MAX_SEED = 2**32 - 1


def _check_number(value: float, option: str, *, positive: bool = False) -> None:
    """A rate, weight or bound: a finite number, at least 0 (`positive`: above 0)."""
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        what = "a finite positive number" if positive else "a finite number >= 0"
        raise UsageError(f"{option} must be {what}, got {value}")


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """What both trainers share: data, model, seed, loader, device, speed, logging, resume."""

    shards: tuple[str, ...] = flag(help=SHARDS_HELP + " Finetuning: the training split.", many=True)
    out: Path = flag(
        help="Run folder: checkpoints, weights (pretraining: model.safetensors and previews; "
        "finetuning: best.safetensors), log.",
        resumable=True,
    )
    model: str = flag(
        "large",
        "Model preset: large | base | small | tiny (video ViTs) | mae3d-base | mae3d-tiny (Table "
        "3's 3D MAE baseline: the whole 96³ crop in 16³ cubes, 216 tokens, fixed 3-D sin-cos "
        "positions; no video weights, --frames and --frame-size stay at their defaults).",
    )
    # Field overrides of the preset, e.g. {"depth": 2} (Python only: tests, sweeps).
    model_overrides: dict[str, Any] = field(default_factory=dict)
    init: Path | None = flag(
        None,
        "Weights to start from: a mae_st / PySlowFast video checkpoint (.pth), or a vctmae "
        ".safetensors (finetuning: pretraining's model.safetensors); omit for random.",
    )
    pos_init: str = flag(
        "crop", "Positional embeddings from a video .pth --init: crop | random | interpolate."
    )
    frame_size: int = flag(
        96,
        "Frame size: 96 (the paper's format: the 96² slices as they are, the video weights' "
        "central 6×6 positions) | 224 (Table 2 row 5: the slices padded with -1000 HU to the "
        "video format 224², the video weights' full 14×14 positional table, 1568 tokens; about "
        "2× the finetuning time). eval uses the checkpoint's.",
        name="--frame-size",
    )
    frames: str = flag("crop", FRAMES_HELP)
    accum_steps: int = flag(1, "Micro-batches per optimizer step.")
    grad_clip: float | None = flag(None, "Clip the gradient norm to this value.")
    flip: str = flag(
        "none",
        "Flip augmentation, per sample with p = 0.5: rows (superior <-> inferior rows of every "
        "frame: the reference code's pretraining flip; its finetuning flips nothing) | frames "
        "(left <-> right: the sagittal order reversed; no counterpart in the reference) | none. "
        "A 3-D model: the same axes of the whole crop.",
    )
    seed: int = flag(0, "Seed of data order, view shifts, flips and masks.")
    loader: LoaderOptions = field(default_factory=LoaderOptions)
    device: str = flag("auto", DEVICE_HELP, resumable=True)
    speed: SpeedOptions = field(default_factory=SpeedOptions)
    cuda_graph: bool = flag(
        True,
        "Capture the training step in a CUDA graph and replay it (CUDA, one process; "
        "otherwise, or when a run cannot be captured, the step runs eagerly, saying why).",
        negatable=True,
        resumable=True,
    )
    resume: bool = flag(False, "Continue from the last checkpoint in --out.", resumable=True)
    checkpoint_every: int = flag(
        1, "Write a checkpoint every N epochs (and after the last); in the background.",
        resumable=True,
    )  # fmt: skip
    log_every: int = flag(20, "Optimizer steps between log records.", resumable=True)
    progress: bool = flag(True, "Show the progress bar.", negatable=True, resumable=True)
    # Cap for smoke runs and benchmarks (Python only).
    max_steps_per_epoch: int | None = None

    def __post_init__(self) -> None:
        check_shards(self.shards)
        if self.accum_steps < 1:
            raise UsageError(f"--accum-steps must be >= 1, got {self.accum_steps}")
        if self.grad_clip is not None:
            _check_number(self.grad_clip, "--grad-clip", positive=True)
        if not 0 <= self.seed <= MAX_SEED:
            raise UsageError(f"--seed must lie in [0, {MAX_SEED}], got {self.seed}")
        one_of(self.device, DEVICES, "--device")
        one_of(self.pos_init, POS_INIT, "--pos-init")
        one_of(self.frames, FRAME_MODES, "--frames")
        one_of(self.flip, FLIPS, "--flip")
        if self.frame_size not in FRAME_SIZES:
            raise UsageError(
                f"--frame-size must be one of {', '.join(map(str, FRAME_SIZES))}, "
                f"got {self.frame_size}"
            )
        if self.log_every < 1:
            raise UsageError(f"--log-every must be >= 1, got {self.log_every}")
        if self.checkpoint_every < 1:
            raise UsageError(f"--checkpoint-every must be >= 1, got {self.checkpoint_every}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise UsageError("max_steps_per_epoch must be >= 1 or None")
        check_out_folder(self.out)
        from vctmae.model.config import preset_config

        # The preset and overrides must make a model (checked before any data is read).
        try:
            preset = preset_config(self.model, **self.model_overrides)
        except (TypeError, ValueError) as error:
            raise UsageError(f"--model {self.model}: {error}") from None
        refuse_frame_options(
            preset, f"--model {self.model}", frames=self.frames, frame_size=self.frame_size
        )
        try:
            preset_config(self.model, **self.model_fields())
        except (TypeError, ValueError) as error:
            raise UsageError(f"--model {self.model}: {error}") from None

    def model_fields(self, **more: Any) -> dict[str, Any]:
        """The preset's field overrides for this run: `model_overrides`, the frame size, `more`."""
        return {"img": self.frame_size, **self.model_overrides, **more}


def _check_schedule(config: Any) -> None:
    if config.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {config.epochs}")
    if config.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {config.batch_size}")
    if not 0 <= config.warmup_epochs <= config.epochs:
        raise UsageError(f"--warmup-epochs must lie in [0, --epochs], got {config.warmup_epochs}")


def check_min_lr(min_lr: float, peak_lr: float, peak: str) -> None:
    """The cosine schedule falls from the peak learning rate to --min-lr: refuse a rising one
    (`peak` says where the peak comes from)."""
    if min_lr > peak_lr:
        raise UsageError(
            f"--min-lr {min_lr:g} is above the peak learning rate {peak_lr:g} ({peak}); the "
            "schedule would rise instead of decay — lower --min-lr"
        )


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    """MAE pretraining on unlabelled crops (paper App. A.5)."""

    run: RunOptions
    mask_ratio: float = flag(0.8, "Fraction of tubes masked.")
    epochs: int = flag(100, "Training epochs.")
    batch_size: int = flag(8, "Crops per step per process.")
    blr: float = flag(1e-3, "Base lr; lr = blr × batch × processes × accum / 256.")
    min_lr: float = flag(0.0, "Final lr of the cosine schedule.")
    warmup_epochs: int = flag(40, "Linear warmup epochs (per-iteration schedule).")
    weight_decay: float = flag(
        0.05, "AdamW weight decay (not on norms, biases, embeddings).", name="--weight-decay"
    )
    betas: tuple[float, float] = (0.9, 0.95)
    norm_pix_loss: bool = flag(
        False,
        "Regress each target patch normalised by its own mean and variance (mae_st's "
        "norm_pix_loss; mae_st's released Kinetics weights were trained with it; the reference "
        "code has the switch, off).",
        name="--norm-pix-loss",
    )
    preview: bool = flag(
        True, "Write a reconstruction preview after each epoch.", negatable=True, resumable=True
    )

    optimizer: ClassVar[str] = "adamw"

    def __post_init__(self) -> None:
        _check_schedule(self)
        if self.run.loader.levels is None:
            # Pretraining, like the reference's, uses every crop it is given.
            loader = dataclasses.replace(self.run.loader, levels="all")
            object.__setattr__(self, "run", dataclasses.replace(self.run, loader=loader))
        if not 0.0 < self.mask_ratio < 1.0:
            raise UsageError(f"--mask-ratio must lie in (0, 1), got {self.mask_ratio}")
        _check_number(self.blr, "--blr", positive=True)
        _check_number(self.min_lr, "--min-lr")
        _check_number(self.weight_decay, "--weight-decay")

    def peak_lr(self, world_size: int) -> float:
        """The MAE scaling rule: lr = blr × effective batch / 256."""
        return self.blr * self.batch_size * world_size * self.run.accum_steps / 256

    @property
    def start_lr(self) -> float:
        return 0.0


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """Fracture classification finetuning (paper App. A.5)."""

    run: RunOptions
    val_shards: tuple[str, ...] = flag((), "Validation shards (validated every epoch).", many=True)
    epochs: int = flag(50, "Training epochs.")
    batch_size: int = flag(64, "Crops per step per process.")
    lr: float = flag(1e-5, "Peak learning rate (Adam).")
    warmup_epochs: int = flag(5, "Warmup epochs from --warmup-lr.")
    warmup_start_lr: float = flag(1e-8, "Learning rate at step 0.", name="--warmup-lr")
    min_lr: float = flag(1e-7, "Final lr of the cosine schedule.")
    # The paper's plain Adam (Python only: a decoupled decay makes it AdamW).
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    class_weights: str = flag(
        "inverse", "inverse (class frequency of the training shards' labels) | none."
    )
    multiview: int = flag(6, MULTIVIEW_HELP + " Used by the validation; recorded as the model's.")
    combine: str = flag("probs", COMBINE_HELP)
    patience: int = flag(40, "Stop after this many epochs without a better validation F1.")
    dropout: float | None = flag(None, "Head dropout (default: the model preset's).")

    optimizer: ClassVar[str] = "adam"

    def __post_init__(self) -> None:
        _check_schedule(self)
        _check_number(self.lr, "--lr", positive=True)
        _check_number(self.warmup_start_lr, "--warmup-lr")
        _check_number(self.min_lr, "--min-lr")
        check_min_lr(self.min_lr, self.lr, "--lr")
        check_rule_options(None, self.multiview, self.combine)
        one_of(self.class_weights, CLASS_WEIGHTS, "--class-weights")
        if self.run.loader.levels is None:
            # The levels the reference finetunes on, whether built here or on the command line.
            loader = dataclasses.replace(self.run.loader, levels=REFERENCE_LEVELS)
            object.__setattr__(self, "run", dataclasses.replace(self.run, loader=loader))
        if self.patience < 1:
            raise UsageError(f"--patience must be >= 1, got {self.patience}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"--dropout must lie in [0, 1), got {self.dropout}")

    def peak_lr(self, world_size: int) -> float:
        return self.lr

    @property
    def start_lr(self) -> float:
        return self.warmup_start_lr


def absolute_shard(spec: str) -> str:
    """How a run's settings and state name a shard: its URL, or its absolute path."""
    return spec if "://" in spec or spec.startswith("pipe:") else os.path.abspath(spec)


def resume_fingerprint(config: Any) -> dict[str, Any]:
    """The settings `--resume` compares, by flag (or field path): every field except those whose
    flag is `resumable`; shard patterns expanded to the files they name (so a glob matching new
    files is a change, and `a*.tar` equals its shell expansion)."""
    from vctmae.data.shards import expand_shards

    values: dict[str, Any] = {}
    for leaf in config_fields(type(config)):
        if leaf.flag is not None and leaf.flag.resumable:
            continue
        value = plain(leaf.value(config))
        if leaf.flag is not None and leaf.flag.many and value:
            value = [absolute_shard(path) for path in expand_shards(value)]
        elif leaf.path[-1] == "init" and value is not None:
            value = os.path.abspath(value)
        values[leaf.name] = value
    return values


def check_resume_config(saved: dict[str, Any], current: dict[str, Any], *, where: Path) -> None:
    """Refuse to resume the run saved at `where` with settings that change what it computes."""
    refuse_changed_settings(
        saved,
        current,
        where=where,
        why="they alter the data order, schedule or model of the run being resumed — resume "
        "with the run's settings, or start a new run in another --out",
    )
