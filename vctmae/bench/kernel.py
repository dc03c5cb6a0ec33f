"""`vctmae bench kernel`: the fused patch embedding vs the torch path, forward and forward+backward.

Baseline (what the paper code does): `sample_frames` → replicate to 3 float channels →
`Conv3d(3, D, (2, 16, 16))` → tokens (+ positions), then keep the visible tokens. Candidate: on a
GPU the Triton kernel (int16 crops straight to the kept tokens); without a GPU the channel-folded
torch reference (one channel, the same Conv3d arithmetic a third as large), since the Triton
interpreter is a debugging tool, not a speed.
Shapes: MAE pretraining (B = 8, 57 of 288 tokens kept) and finetuning (B = 64, all 288 tokens).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vctmae.bench.report import Report, time_calls
from vctmae.clip import clip_frames, frame_index_tensor
from vctmae.kernels import patch_embed
from vctmae.kernels.reference import NUM_TOKENS


@dataclass(frozen=True, kw_only=True)
class Shape:
    """One benchmark shape: batch size and kept tokens per sample (None = all 288)."""

    name: str
    batch: int
    keep: int | None


PAPER_SHAPES = (
    Shape(name="pretrain", batch=8, keep=57),
    Shape(name="finetune", batch=64, keep=None),
)


@dataclass
class Problem:
    """Random crops, frame indices, kept tokens and patch-embedding parameters on one device."""

    crops: torch.Tensor
    frames: torch.Tensor  # (B, 16) slice indices, the paper's o + 6k
    keep: torch.Tensor | None
    conv: nn.Conv3d
    pos: torch.Tensor

    @classmethod
    def random(cls, shape: Shape, dim: int, device: torch.device) -> Problem:
        crops = torch.randint(
            -1500, 1500, (shape.batch, 96, 96, 96), dtype=torch.int16, device=device
        )
        frames = frame_index_tensor("crop", torch.randint(0, 6, (shape.batch,), device=device))
        keep = None
        if shape.keep is not None:
            noise = torch.rand(shape.batch, NUM_TOKENS, device=device)
            keep = torch.argsort(noise, dim=1)[:, : shape.keep]  # (B, K) as MAE random masking
        conv = nn.Conv3d(3, dim, (2, 16, 16), stride=(2, 16, 16), device=device)
        pos = (0.02 * torch.randn(NUM_TOKENS, dim, device=device)).requires_grad_(True)
        return cls(crops=crops, frames=frames, keep=keep, conv=conv, pos=pos)

    def torch_rgb(self, backward: bool) -> None:
        """Baseline: sample_frames + RGB floats + Conv3d (bf16 autocast on a GPU, as training)."""
        device = self.crops.device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            clip = clip_frames(self.crops, self.frames).expand(-1, 3, -1, -1, -1)
            tokens = self.conv(clip).flatten(2).transpose(1, 2) + self.pos  # (B, 288, D)
            if self.keep is not None:
                tokens = tokens.gather(1, self.keep[:, :, None].expand(-1, -1, tokens.shape[-1]))
        if backward:
            tokens.float().sum().backward()

    def fused(self, backward: bool, backend: str) -> None:
        """Candidate: vctmae.kernels.patch_embed on the channel-folded weight."""
        weight = self.conv.weight.sum(1).flatten(1)  # (D, 512)
        tokens = patch_embed(
            self.crops,
            self.frames,
            weight,
            self.conv.bias,
            keep=self.keep,
            pos=self.pos,
            backend=backend,
        )
        if backward:
            tokens.float().sum().backward()


def measure(
    shape: Shape, *, dim: int, device: torch.device, backend: str, warmup: int, reps: int
) -> list[dict[str, Any]]:
    """Candidate and baseline times for the forward and forward+backward passes of one shape."""
    problem = Problem.random(shape, dim, device)

    def median_ms(run) -> float:
        return statistics.median(time_calls(run, device=device, warmup=warmup, repeats=reps)) * 1e3

    rows = []
    for backward in (False, True):
        candidate = median_ms(lambda b=backward: problem.fused(b, backend))
        baseline = median_ms(lambda b=backward: problem.torch_rgb(b))
        rows.append(
            {
                "shape": shape.name,
                "batch": shape.batch,
                "keep": shape.keep,
                "pass": "fwd+bwd" if backward else "fwd",
                "backend": backend,
                "candidate_ms": candidate,
                "torch_rgb_ms": baseline,
                "speedup": baseline / candidate,
            }
        )
    return rows


def run_kernel_benchmark(
    *, json_path: Path | str | None = None, quick: bool = False, dim: int = 1024
) -> Path:
    """Time the patch embedding on the GPU if present (Triton), else the torch reference, vs the RGB path."""
    report = Report("kernel")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    backend = "triton" if cuda else "torch"
    candidate_name = "triton" if cuda else "torch_folded"
    if cuda:
        shapes, warmup, reps = PAPER_SHAPES, 5, (10 if quick else 50)
    else:
        # Two cores: the finetune shape at B = 64 takes seconds a pass; --quick keeps it about a minute.
        shapes = (PAPER_SHAPES[0], Shape(name="finetune", batch=8 if quick else 16, keep=None))
        warmup, reps = 1, (2 if quick else 4)
        if quick:
            dim = min(dim, 384)
    rows = [
        r
        for shape in shapes
        for r in measure(shape, dim=dim, device=device, backend=backend, warmup=warmup, reps=reps)
    ]
    for r in rows:
        key = f"{r['shape']}_b{r['batch']}_{r['pass'].replace('+', '_')}"
        report.add(f"{key}_{candidate_name}", r["candidate_ms"], "ms")
        report.add(f"{key}_torch_rgb", r["torch_rgb_ms"], "ms")
        report.ratios[f"{key}_{candidate_name}_over_torch_rgb_speed"] = r["speedup"]
    config = {
        "dim": dim,
        "device": str(device),
        "candidate": candidate_name,
        "gpu_present": cuda,
        "note": None
        if cuda
        else "no GPU: Triton not timed (interpreter only); candidate is the folded torch path",
        "shapes": [{"name": s.name, "batch": s.batch, "keep": s.keep} for s in shapes],
        "warmup": warmup,
        "reps": reps,
        "quick": quick,
    }
    return report.write(json_path=json_path, config=config)
