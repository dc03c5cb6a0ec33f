"""`vctmae bench step`: the trainers' own `Trainer.train_step`, timed.

Each case builds the trainer exactly as `vctmae pretrain` / `vctmae finetune`
do (`pretrain_trainer` / `finetune_trainer` on shards written for the run) and
times its `train_step` on batches already on the device, so the loader is not
in the number (`vctmae bench loader` measures it). Modes are speed options of
the same step:

- `eager_fp32` — fp32, torch patch embedding, no compilation, no graph: the
  paper code's configuration, the baseline of every ratio;
- `bf16` — bf16 autocast (GPU), the Triton patch embedding where available, eager;
- `compiled` — `bf16` plus `torch.compile`;
- `graphed` — `bf16` captured in a CUDA graph and replayed (the default on a GPU);
- `compiled_graphed` — both.

Compilation and warm-up steps are outside the timed region; each case is timed
in `repeats` rounds of `steps` steps and reports the median round and the
spread (min, max). Model FLOPs per sample are counted from the layer shapes
(`training_flops_per_sample`); MFU is given against the card's datasheet dense
bf16 peak and against the bf16 matmul rate measured in the same run.
`recipe_projection` turns the measured rates into the wall time of the paper's
whole recipe.
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vctmae.bench.report import Report, bench_device, time_calls
from vctmae.synth.phantoms import write_random_shards

# Dense bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s (no sparsity).
DATASHEET_BF16_TFLOPS = {"A40": 149.7, "A100": 312.0, "H100": 989.0, "H200": 989.0}

# The paper's recipe (Table 1, App. A.5): MAE pretraining on 27,776 crops, 100 epochs at
# batch 8; finetuning on 3,892 training crops, 50 epochs at batch 64, validated every epoch
# with 6 views on the validation split (VerSe's 60/20/20 patient split: a third of the
# training split's size).
PAPER_RECIPE = {
    "pretrain_crops": 27_776,
    "pretrain_epochs": 100,
    "pretrain_batch": 8,
    "finetune_crops": 3_892,
    "finetune_epochs": 50,
    "finetune_batch": 64,
    "validation_crops": 3_892 // 3,
    "validation_views": 6,
}

MODES = ("eager_fp32", "bf16", "compiled", "graphed", "compiled_graphed")
# Modes that need a CUDA device.
GPU_MODES = ("bf16", "graphed", "compiled_graphed")


@dataclass(frozen=True, kw_only=True)
class StepCase:
    """One timed configuration: which trainer, model, batch size and speed mode."""

    kind: str  # "pretrain" | "finetune"
    preset: str
    batch: int
    mode: str

    @property
    def name(self) -> str:
        return f"{self.kind}_b{self.batch}_{self.mode}"


def mode_options(mode: str) -> dict[str, Any]:
    """The RunOptions fields a mode sets: its SpeedOptions and whether the step is captured."""
    from vctmae.infer.config import SpeedOptions

    speeds = {
        "eager_fp32": SpeedOptions(precision="fp32", patch_embed="torch"),
        "bf16": SpeedOptions(precision="bf16"),
        "compiled": SpeedOptions(compile=True),
        "graphed": SpeedOptions(precision="bf16"),
        "compiled_graphed": SpeedOptions(compile=True),
    }
    if mode not in speeds:
        raise ValueError(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")
    return {"speed": speeds[mode], "cuda_graph": mode.endswith("graphed")}


# ----------------------------------------------------------------------------- FLOPs and peaks


def linear_macs(module: nn.Module) -> int:
    """Σ fan_in·fan_out over the nn.Linear layers of a module."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def training_flops_per_sample(model: nn.Module, kind: str, mask_ratio: float = 0.8) -> float:
    """Model FLOPs of one training sample, forward + backward = 3 × forward.

    Forward = 2 × (multiply-accumulates of every linear layer at its token count + the
    channel-folded patch embedding) + the attention matmuls (QKᵀ and AV: 2·2·N²·D per block).
    MAE: the encoder sees the visible tokens (+ cls), the decoder all tokens.
    """
    from vctmae.model import visible_count

    cfg = model.config
    tokens = cfg.num_tokens
    embed_macs = cfg.t_patch * cfg.patch * cfg.patch * cfg.embed_dim
    encoder_block_macs = linear_macs(model.blocks)
    if kind == "pretrain":
        visible = visible_count(tokens, mask_ratio)
        n_enc, n_dec = 1 + visible, tokens + int(cfg.decoder_cls)
        macs = (
            embed_macs * visible
            + encoder_block_macs * n_enc
            + linear_macs(model.decoder_embed) * visible
            + linear_macs(model.decoder_blocks) * n_dec
            + linear_macs(model.decoder_pred) * tokens
        )
        attention = (
            cfg.depth * n_enc**2 * cfg.embed_dim
            + cfg.decoder_depth * n_dec**2 * cfg.decoder_embed_dim
        )
    else:
        n_enc = 1 + tokens
        macs = embed_macs * tokens + encoder_block_macs * n_enc + linear_macs(model.head)
        attention = cfg.depth * n_enc**2 * cfg.embed_dim
    return 3 * (2.0 * macs + 4.0 * attention)


def datasheet_peak(gpu: str | None) -> float | None:
    """The card's datasheet dense bf16 peak (TFLOP/s), when it is in the table."""
    if not gpu:
        return None
    for card, tflops in DATASHEET_BF16_TFLOPS.items():
        if card in gpu:
            return tflops
    return None


def measured_matmul_tflops(device: torch.device) -> float:
    """bf16 matmul rate of this device (fp32 on CPU), TFLOP/s: the fastest of the repeats, as
    it stands for the device's peak (a median of a few repeats on a shared CPU can fall below
    what the training step itself reaches)."""
    n = 8192 if device.type == "cuda" else 1024
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = time_calls(
        lambda: a @ b, device=device, warmup=3, repeats=22 if device.type == "cuda" else 10
    )
    return 2 * n**3 / min(seconds) / 1e12


# ----------------------------------------------------------------------------- the timed step


def build_trainer(case: StepCase, shards: Sequence[str], out: Path, device: str):
    """The trainer the product builds for `case` (one epoch, no warmup, no checkpoints read)."""
    from vctmae.data.options import LoaderOptions
    from vctmae.train.config import FinetuneConfig, PretrainConfig, RunOptions
    from vctmae.train.finetune import finetune_trainer
    from vctmae.train.pretrain import pretrain_trainer

    run = RunOptions(
        shards=tuple(shards),
        out=out,
        model=case.preset,
        loader=LoaderOptions(workers=0),
        device=device,
        progress=False,
        **mode_options(case.mode),
    )
    if case.kind == "pretrain":
        return pretrain_trainer(
            PretrainConfig(run=run, epochs=1, warmup_epochs=0, batch_size=case.batch)
        )
    return finetune_trainer(
        FinetuneConfig(run=run, epochs=1, warmup_epochs=0, batch_size=case.batch)
    )


def time_case(
    case: StepCase, shards: Sequence[str], out: Path, *, device: str, steps: int, repeats: int
) -> dict[str, Any]:
    """Median ms/step (and spread) of `Trainer.train_step` for one case."""
    trainer = build_trainer(case, shards, out, device)
    dev = trainer.run.info.device
    batches = []
    for batch in trainer.run.loader:
        batches.append(batch)
        if len(batches) == min(steps, 4):
            break
    trainer.run.model.train()
    cycle = itertools.cycle(batches)
    losses = []

    def step() -> None:
        losses.append(trainer.train_step([next(cycle)]).loss_sum)

    # Warm-up: compilation, autotuning, allocator growth stay outside the timed rounds.
    warmup = 3 if "compiled" in case.mode else 2
    seconds = time_calls(step, device=dev, warmup=warmup, repeats=repeats, calls=steps)
    if not torch.isfinite(losses[-1]).item():
        raise RuntimeError(f"{case.name}: non-finite loss")
    rounds = [s * 1e3 for s in seconds]
    median = statistics.median(rounds)
    flops = training_flops_per_sample(trainer.run.model, case.kind)
    result = {
        "case": dataclasses.asdict(case),
        "ms_per_step": median,
        "ms_min": min(rounds),
        "ms_max": max(rounds),
        "samples_per_s": case.batch / (median / 1e3),
        "tflops": flops * case.batch / (median / 1e3) / 1e12,
        "flops_per_sample": flops,
    }
    if dev.type == "cuda":
        result["max_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
        torch.cuda.reset_peak_memory_stats(dev)
    return result


# ----------------------------------------------------------------------------- the recipe


def recipe_projection(rates: dict[str, float], *, checkpoint_s: float = 0.0) -> dict[str, float]:
    """Wall time (s) of the paper's recipe from measured samples/s.

    `rates`: "pretrain" (at the recipe's batch 8), "finetune" (batch 64), "validation"
    (6-view forward samples/s); `checkpoint_s`: seconds per checkpoint written (one per epoch).
    """
    r = PAPER_RECIPE
    pretrain = r["pretrain_epochs"] * r["pretrain_crops"] / rates["pretrain"]
    finetune = r["finetune_epochs"] * r["finetune_crops"] / rates["finetune"]
    validation = r["finetune_epochs"] * r["validation_crops"] / rates["validation"]
    checkpoints = (r["pretrain_epochs"] + r["finetune_epochs"]) * checkpoint_s
    return {
        "pretrain_s": pretrain,
        "finetune_s": finetune,
        "validation_s": validation,
        "checkpoints_s": checkpoints,
        "total_s": pretrain + finetune + validation + checkpoints,
    }


def validation_rate(preset: str, batch: int, device: torch.device, views: int = 6) -> float:
    """Crops/s of `views`-view validation forward passes (bf16 autocast on GPU)."""
    from vctmae.infer.device import install_patch_embed
    from vctmae.infer.views import multiview_probs
    from vctmae.model import build_classifier

    model = build_classifier(preset).to(device).eval()
    install_patch_embed(model, "auto", device)
    crops = torch.randint(-1200, 1500, (batch, 96, 96, 96), dtype=torch.int16, device=device)
    calls = 5 if device.type == "cuda" else 1
    seconds = time_calls(
        lambda: multiview_probs(model, crops, views=views, device=device),
        device=device,
        warmup=2,
        repeats=1,
        calls=calls,
    )
    return batch / seconds[0]


def checkpoint_seconds(preset: str, out: Path) -> float:
    """Seconds to write one pretraining checkpoint (weights + AdamW state) of `preset`."""
    from vctmae.model import build_mae
    from vctmae.train.checkpoint import save_checkpoint
    from vctmae.train.optim import build_optimizer

    model = build_mae(preset)
    optimizer = build_optimizer(
        model, "adamw", lr=1e-4, weight_decay=0.05, betas=(0.9, 0.95), device=torch.device("cpu")
    )
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    state = {"optimizer": optimizer.state_dict()}

    def save() -> None:
        save_checkpoint(out, kind="pretrain", model=model, state=state, epoch=1)

    return time_calls(save, warmup=0, repeats=1)[0]


# ----------------------------------------------------------------------------- the command


def default_cases(preset: str, *, gpu: bool, quick: bool) -> list[StepCase]:
    """GPU: the paper's batches (8, 64) and 256 in every mode; CPU: batch 8, fp32 eager vs compiled
    (the other modes need CUDA)."""
    if gpu:
        batches = {
            "pretrain": (8,) if quick else (8, 256),
            "finetune": (64,) if quick else (64, 256),
        }
        modes = MODES
    else:
        batches = {"pretrain": (8,), "finetune": (8,)}
        modes = tuple(m for m in MODES if m not in GPU_MODES)
    return [
        StepCase(kind=kind, preset=preset, batch=batch, mode=mode)
        for kind, sizes in batches.items()
        for batch in sizes
        for mode in modes
    ]


def run_step_benchmark(
    *,
    json_path: Path | None = None,
    quick: bool = False,
    preset: str | None = None,
    device: str | None = None,
    cases: Sequence[StepCase] | None = None,
    recipe: bool = False,
) -> Path:
    """Time every case, print the table, write benchmarks/results/step.json (or `json_path`)."""
    from vctmae.provenance import machine_info

    report = Report("step")
    dev = bench_device(device)
    gpu = dev.type == "cuda"
    preset = preset or ("large" if gpu else "tiny")
    cases = list(cases or default_cases(preset, gpu=gpu, quick=quick))
    steps = (5 if quick else 20) if gpu else (2 if quick else 5)
    repeats = 3 if (gpu or not quick) else 2
    measured_peak = measured_matmul_tflops(dev)
    sheet_peak = datasheet_peak(machine_info()["gpu"]) if gpu else None
    timings: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        shard_count = max(c.batch for c in cases) * 4
        shards = write_random_shards(Path(tmp) / "shards", shard_count)
        for case in cases:
            timings[case.name] = time_case(
                case, shards, Path(tmp) / case.name, device=str(dev), steps=steps, repeats=repeats
            )
            _add_case(report, case, timings, measured_peak, sheet_peak)
        if recipe:
            pretrain, pretrain_batch = _best_rate(
                timings, "pretrain", PAPER_RECIPE["pretrain_batch"]
            )
            finetune, finetune_batch = _best_rate(
                timings, "finetune", PAPER_RECIPE["finetune_batch"]
            )
            rates = {
                "pretrain": pretrain,
                "finetune": finetune,
                "validation": validation_rate(preset, finetune_batch, dev),
            }
            projection = recipe_projection(
                rates, checkpoint_s=checkpoint_seconds(preset, Path(tmp) / "ckpt")
            )
            for name, seconds in projection.items():
                report.add(f"recipe_{name}", seconds, "s")
            for name, rate in rates.items():
                report.add(f"recipe_{name}_samples_per_s", rate, "samples/s")
            # The recipe's batches are 8 and 64; a smaller machine measures what it can.
            report.add("recipe_pretrain_batch", pretrain_batch, "crops")
            report.add("recipe_finetune_batch", finetune_batch, "crops")
    config = {
        "preset": preset,
        "device": str(dev),
        "steps": steps,
        "repeats": repeats,
        "measured_matmul_tflops": measured_peak,
        "datasheet_bf16_tflops": sheet_peak,
        "threads": torch.get_num_threads(),
        "statistic": "median of repeats rounds of steps steps after warm-up; ms_min/ms_max = spread",
        "baseline": "eager_fp32: the trainer's step in fp32 with the torch patch embedding",
        "timings": timings,
        "recipe": PAPER_RECIPE if recipe else None,
    }
    return report.write(json_path=json_path, config=config)


def _best_rate(timings: dict[str, dict[str, Any]], kind: str, batch: int) -> tuple[float, int]:
    """The fastest measured rate of `kind` at `batch` (else at the largest batch measured)."""
    measured = [t for t in timings.values() if t["case"]["kind"] == kind]
    if not measured:
        raise ValueError(f"--recipe needs a {kind} case")
    at_batch = [t for t in measured if t["case"]["batch"] == batch]
    if not at_batch:
        largest = max(t["case"]["batch"] for t in measured)
        at_batch = [t for t in measured if t["case"]["batch"] == largest]
    best = max(at_batch, key=lambda t: t["samples_per_s"])
    return best["samples_per_s"], best["case"]["batch"]


def _add_case(
    report: Report,
    case: StepCase,
    timings: dict[str, dict[str, Any]],
    measured_peak: float,
    sheet_peak: float | None,
) -> None:
    """A timed case's rate, step time and MFU, and its ratios over the modes timed before it:
    every mode over the fp32 baseline, the compiled or graphed modes over bf16 eager."""
    t = timings[case.name]
    report.add(case.name, t["samples_per_s"], "samples/s")
    report.add(f"{case.name}_ms", t["ms_per_step"], "ms/step")
    report.add(f"{case.name}_mfu_measured", t["tflops"] / measured_peak, "fraction")
    if sheet_peak:
        report.add(f"{case.name}_mfu_datasheet", t["tflops"] / sheet_peak, "fraction")
    for base_mode in ("eager_fp32", "bf16"):
        baseline = f"{case.kind}_b{case.batch}_{base_mode}"
        if case.mode not in ("eager_fp32", base_mode) and baseline in timings:
            report.ratios[f"{case.name}_over_{baseline}"] = (
                t["samples_per_s"] / timings[baseline]["samples_per_s"]
            )
