"""Configurations of evaluation and explanation, and the options inference shares with training.

Frozen keyword-only dataclasses. Each field that is a command-line option says so with
`vctmae.flags.flag` (flag, help, default in one place; the command line derives the commands
from these classes). A value that cannot be used is a `vctmae.errors.UsageError` (exit 2) naming
its flag. Torch-free: the command line imports this module to build its options.

The clip-rule options (`--frames`, `--multiview`, `--combine`) of eval, explain and predict
default to the rule the checkpoint was finetuned with (None here); `check_rule_options` checks
the ones given.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vctmae.clip import COMBINE_MODES, FRAME_MODES, VIEW_COUNTS
from vctmae.data.options import LoaderOptions
from vctmae.errors import UsageError
from vctmae.flags import flag

if TYPE_CHECKING:
    from vctmae.model.config import ModelConfig

DEVICES = ("auto", "cpu", "cuda")
PATCH_EMBED = ("auto", "torch", "triton")
PRECISIONS = ("auto", "bf16", "fp32")

SHARDS_HELP = (
    "WebDataset shards: paths (an unquoted glob's many paths), a quoted glob or a brace pattern."
)
DEVICE_HELP = (
    "auto (GPU when present), cpu or cuda; under torchrun each process takes its LOCAL_RANK GPU."
)
FRAMES_HELP = (
    "Frame rule: crop (the paper's text: slices o + 6k of the whole crop; training offset o in "
    "0..5, six evaluation views covering every slice) | mask (the paper's code: 16 frames spread "
    "over the vertebra mask's own sagittal extent, lo + round(linspace(0, w-1, 18))[1:-1], "
    "shifts range(-sd//2, sd//2) for training and as the evaluation views, and the in-plane "
    "context cut: the mask's rows +-16, all columns, padded with -1000 HU). Mask mode needs "
    "ingest's bbox metadata."
)
MULTIVIEW_HELP = (
    "Views per crop: 6 (the full ensemble: crop mode's six offsets, together every slice; mask "
    "mode each sample's own 3-6 shifts) or 1 (crop: offset 3; mask: shift 0, where the reference "
    "draws a random shift). A 3-D model sees the whole crop: one view either way."
)
PRECISION_HELP = (
    "Number format: auto | bf16 | fp32. auto: bf16 autocast on a GPU; on the CPU fp32 for "
    "training, and for eval, explain and predict bf16 where the CPU computes it natively (AMX "
    "or AVX-512 BF16), else fp32."
)
COMBINE_HELP = (
    "How multi-view predictions combine: probs (mean of the views' softmax probabilities) | "
    "logits (mean of the views' logits, then softmax: what the reference code does)."
)
# How eval, explain and predict say that an option defaults to the checkpoint's clip rule.
RULE_DEFAULT = " Default: the rule the checkpoint was finetuned with."


def one_of(value: str, allowed: tuple[str, ...], option: str) -> None:
    """Refuse a value of `option` outside `allowed`."""
    if value not in allowed:
        raise UsageError(f"{option} must be one of {', '.join(allowed)}, got {value!r}")


def check_out_folder(out: Path) -> None:
    """An `--out` that is a folder or does not exist yet."""
    if Path(out).exists() and not Path(out).is_dir():
        raise UsageError(f"{out}: --out names a file; give a folder for the outputs")


def check_shards(shards: tuple[str, ...], option: str = "--shards") -> None:
    """At least one shard path, glob or pattern."""
    if not shards:
        raise UsageError(f"{option}: give at least one shard path, glob or brace pattern")


def check_rule_options(frames: str | None, multiview: int | None, combine: str | None) -> None:
    """The clip-rule options of eval, explain and predict (None: the checkpoint's)."""
    if frames is not None:
        one_of(frames, FRAME_MODES, "--frames")
    if multiview is not None and multiview not in VIEW_COUNTS:
        raise UsageError(f"--multiview must be 1 or 6, got {multiview}")
    if combine is not None:
        one_of(combine, COMBINE_MODES, "--combine")


def refuse_frame_options(
    model: ModelConfig, who: str, *, frames: str, frame_size: int | None = None
) -> None:
    """A 3-D model (`ModelConfig.volume`, the `mae3d-*` presets) reads the whole crop: refuse the
    flags that choose or pad frames for it (`who` names the model: a preset or a checkpoint)."""
    if not model.volume:
        return
    if frames != "crop":
        raise UsageError(
            f"--frames {frames}: {who} is {model.describe()}, which reads the whole crop; "
            "frame rules are for video models"
        )
    if frame_size is not None and frame_size != model.img:
        raise UsageError(
            f"--frame-size {frame_size}: {who} is {model.describe()}, which reads the "
            f"{model.img}³ crop as it is; frame sizes are for video models"
        )


@dataclass(frozen=True, kw_only=True)
class SpeedOptions:
    """How the model is computed: kernels, compilation, number format (`vctmae.infer.device`)."""

    compile: bool = flag(False, "torch.compile the model.", resumable=True)
    patch_embed: str = flag(
        "auto",
        "Patch embedding: auto | torch | triton (the fused kernel gathers video frames: a 3-D "
        "model always takes torch, and refuses triton).",
        name="--patch-embed",
        resumable=True,
    )
    precision: str = flag("auto", PRECISION_HELP)

    def __post_init__(self) -> None:
        one_of(self.patch_embed, PATCH_EMBED, "--patch-embed")
        one_of(self.precision, PRECISIONS, "--precision")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Multi-view evaluation of a finetuned classifier."""

    checkpoint: Path = flag(help="Classifier weights (.safetensors from finetune).")
    shards: tuple[str, ...] = flag(help=SHARDS_HELP, many=True)
    out: Path = flag(Path("report"), "Folder for predictions.csv, metrics.json, roc.png, pr.png.")
    frames: str | None = flag(None, FRAMES_HELP + RULE_DEFAULT)
    multiview: int | None = flag(None, MULTIVIEW_HELP + RULE_DEFAULT)
    combine: str | None = flag(None, COMBINE_HELP + RULE_DEFAULT)
    batch_size: int = flag(64, "Crops per forward pass per process.")
    loader: LoaderOptions = field(default_factory=LoaderOptions)
    device: str = flag("auto", DEVICE_HELP)
    speed: SpeedOptions = field(default_factory=SpeedOptions)
    progress: bool = flag(True, "Print the metrics table.", negatable=True)

    def __post_init__(self) -> None:
        check_shards(self.shards)
        check_rule_options(self.frames, self.multiview, self.combine)
        one_of(self.device, DEVICES, "--device")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {self.batch_size}")
        check_out_folder(self.out)


@dataclass(frozen=True, kw_only=True)
class ExplainConfig:
    """Attention picture of one crop."""

    checkpoint: Path = flag(help="Classifier weights (.safetensors).")
    zarr: Path = flag(help="Zarr store written by ingest (crops.zarr).")
    key: str = flag(help="Crop key, e.g. case-0003_L1 (see manifest.csv).")
    out: Path = flag(Path("explain.png"), "PNG to write.")
    offset: int | None = flag(
        None,
        "The view to draw: crop mode its offset 0-5, mask mode its shift (default: the middle "
        "view, offset 3 or shift 0).",
    )
    frames: str | None = flag(None, FRAMES_HELP + RULE_DEFAULT)
    multiview: int | None = flag(None, MULTIVIEW_HELP + RULE_DEFAULT)
    combine: str | None = flag(None, COMBINE_HELP + RULE_DEFAULT)
    device: str = flag("cpu", "cpu or cuda.")
    precision: str = flag("auto", PRECISION_HELP)

    def __post_init__(self) -> None:
        check_rule_options(self.frames, self.multiview, self.combine)
        one_of(self.device, DEVICES, "--device")
        one_of(self.precision, PRECISIONS, "--precision")
        if Path(self.out).is_dir():
            raise UsageError(f"{self.out}: --out names a folder; give the PNG file to write")


def plain(value: Any) -> Any:
    """A config value as JSON holds it: paths as strings, tuples as lists."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def config_dict(config: Any) -> dict[str, Any]:
    """JSON-ready view of a (nested) config, paths as strings, for logs and checkpoints."""
    return {
        f.name: config_dict(value)
        if dataclasses.is_dataclass(value := getattr(config, f.name))
        else plain(value)
        for f in dataclasses.fields(config)
    }
