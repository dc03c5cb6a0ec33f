"""`vctmae bench step`: samples/s of the pretraining and finetuning steps (SPEC §9).

On CPU (tiny preset) the candidate is the trainer's own step — int16 crops in,
frames sampled on the device, one input channel with channel-folded
patch weights (`forward_crops`), the optimizer's multi-tensor path, no host
sync — and the baseline an eager fp32 configuration like the paper code's:
float frames replicated to 3 channels, `model(x)`, single-tensor optimizer,
`loss.item()` every step. Both run in the same process on the same batches,
after untimed warm-up steps. ViT-L on a GPU (MFU, bf16, Triton, fused AdamW) is
measured by `benchmarks/gpu_check.sh`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vctmae.train.optim import param_groups

GPU_POINTER = (
    "a GPU is present: the ViT-L step benchmark (samples/s, MFU) is benchmarks/gpu_check.sh; "
    "this command measures the tiny preset on CPU"
)


def _time_steps(step, warmup: int, steps: int, batch: int) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - start)


def _pretrain_steps(model: nn.Module, crops: torch.Tensor, generator: torch.Generator):
    from vctmae.data import offset_frames, random_offsets

    candidate_opt = torch.optim.AdamW(
        param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95), foreach=True
    )
    baseline_opt = torch.optim.AdamW(
        param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95), foreach=False
    )
    size, tokens = crops.shape[0], model.config.num_tokens

    def candidate() -> None:
        offsets = random_offsets(size, generator=generator)
        noise = torch.rand(size, tokens, generator=generator)
        loss, _, _ = model(crops, offset_frames(offsets), mask_ratio=0.8, noise=noise)
        loss.backward()
        candidate_opt.step()
        candidate_opt.zero_grad(set_to_none=True)

    def baseline() -> None:
        offsets = random_offsets(size, generator=generator)
        noise = torch.rand(size, tokens, generator=generator)
        loss, _, _ = model(crops, offset_frames(offsets), mask_ratio=0.8, noise=noise)
        loss.backward()
        baseline_opt.step()
        baseline_opt.zero_grad()
        loss.item()  # the reference code's per-step host read

    return candidate, baseline


def _finetune_steps(
    model: nn.Module, crops: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
):
    from vctmae.data import offset_frames, random_offsets

    candidate_opt = torch.optim.Adam(model.parameters(), lr=1e-5, foreach=True)
    baseline_opt = torch.optim.Adam(model.parameters(), lr=1e-5, foreach=False)
    weight = torch.tensor([1.0, 3.0])
    size = crops.shape[0]

    def candidate() -> None:
        offsets = random_offsets(size, generator=generator)
        logits = model(crops, offset_frames(offsets))
        nn.functional.cross_entropy(logits.float(), labels, weight=weight).backward()
        candidate_opt.step()
        candidate_opt.zero_grad(set_to_none=True)

    def baseline() -> None:
        offsets = random_offsets(size, generator=generator)
        loss = nn.functional.cross_entropy(
            model(crops, offset_frames(offsets)), labels, weight=weight
        )
        loss.backward()
        baseline_opt.step()
        baseline_opt.zero_grad()
        loss.item()

    return candidate, baseline


def measure_step(
    *, preset: str = "tiny", batch: int = 8, steps: int = 6, warmup: int = 2, seed: int = 0
) -> dict[str, float]:
    """Samples/s of candidate and baseline steps, pretraining and finetuning, on CPU."""
    from vctmae.model import build_classifier, build_mae

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    crops = torch.randint(-1200, 1500, (batch, 96, 96, 96), dtype=torch.int16, generator=generator)
    labels = torch.randint(0, 2, (batch,), generator=generator)
    results: dict[str, float] = {}
    mae = build_mae(preset).train()
    candidate, baseline = _pretrain_steps(mae, crops, generator)
    results["pretrain_step"] = _time_steps(candidate, warmup, steps, batch)
    results["pretrain_step_eager_fp32_baseline"] = _time_steps(baseline, warmup, steps, batch)
    classifier = build_classifier(preset).train()
    candidate, baseline = _finetune_steps(classifier, crops, labels, generator)
    results["finetune_step"] = _time_steps(candidate, warmup, steps, batch)
    results["finetune_step_eager_fp32_baseline"] = _time_steps(baseline, warmup, steps, batch)
    return results


def run_step_benchmark(*, json_path: Path | None = None, quick: bool = False) -> dict[str, Any]:
    """Measure, print the table and write benchmarks/results/step.json (or `json_path`)."""
    from rich.console import Console

    from vctmae.bench.report import Result, write_report

    if torch.cuda.is_available():
        Console().print(GPU_POINTER)
    config = {"preset": "tiny", "batch": 8, "steps": 3 if quick else 10, "warmup": 1 if quick else 2, "device": "cpu",
              "threads": torch.get_num_threads()}  # fmt: skip
    rates = measure_step(
        preset=config["preset"],
        batch=config["batch"],
        steps=config["steps"],
        warmup=config["warmup"],
    )
    results = [Result(name=name, value=value, unit="samples/s") for name, value in rates.items()]
    ratios = {
        "pretrain_step_over_eager_fp32_baseline": rates["pretrain_step"]
        / rates["pretrain_step_eager_fp32_baseline"],
        "finetune_step_over_eager_fp32_baseline": rates["finetune_step"]
        / rates["finetune_step_eager_fp32_baseline"],
    }
    path = write_report("step", results=results, ratios=ratios, json_path=json_path, config=config)
    return {"rates": rates, "ratios": ratios, "path": str(path)}
