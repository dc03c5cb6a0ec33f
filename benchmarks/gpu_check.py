"""One prepared GPU check for a lent card: correctness, matmul peak, ViT-L step rates/MFU, kernel speed.

Run through `benchmarks/gpu_check.sh` (repo root on PYTHONPATH, nothing installed). Imports only
torch, triton and vctmae (kernels, model, bench, provenance, and train.speed, which chooses the
model's patch-embedding route) with their core dependencies. Sections:

1. correctness — the Triton patch embedding vs a float64 reference on the GPU, forward and backward,
   with fp32 dots (indexing exact: < 1e-5) and bf16 dots (< 1e-2: 2^-9 operand rounding, ~3e-3 on
   long sums); the model's forward on crops with the Triton vs the torch patch embedding, each
   installed by `vctmae.train.speed.install_patch_embed`.
2. peak — median bf16 8192³ matmul rate on random data: the MFU denominator.
3. steps — ViT-L at 16×96×96: MAE pretraining step (fwd+bwd+AdamW) and classifier finetuning step
   (fwd+bwd+Adam) at the paper batch sizes (8, 64) and larger, (a) SDPA + bf16 autocast + fused
   optimizer + Triton patch embedding, (b) the same under torch.compile (both through
   `vctmae.train.speed.apply_speedups`, as training), (c) eager fp32 as the paper code (fp32, math
   attention, for-loop optimizer) with the torch patch embedding (frame gather + Conv3d).
4. patch_embed — Triton kernel vs the torch path (sample_frames + Conv3d on replicated RGB floats),
   forward+backward, at the pretraining (keep 57 of 288) and finetuning (all 288) shapes.

MFU = model FLOPs per second / measured bf16 peak. Training FLOPs per sample =
  6 · Σ_linear (fan_in · fan_out · tokens through it)           [weights: fwd 2, bwd 4 per MAC]
+ 12 · Σ_attention layers (N² · width)                          [QKᵀ and AV: fwd 4·N²·width, ×3]
with the patch embedding counted as a (512 → D) linear on the tokens it embeds (57 visible ones in
MAE pretraining, all 288 when finetuning), encoder N = 1 + 57 (MAE) or 1 + 288 (classifier),
decoder N = 288. The eager fp32 baseline is credited with the same model FLOPs.

CPU dry run (no GPU: Triton runs in its interpreter with fp32 dots, tiny model, few steps):
    python benchmarks/gpu_check.py --device cpu --preset tiny
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu = dry run")
    parser.add_argument("--preset", default=None, help="model preset (default: large; tiny on cpu)")
    parser.add_argument("--pretrain-batches", default=None, help="comma list (default 8,32,64)")
    parser.add_argument("--finetune-batches", default=None, help="comma list (default 64,128,256)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument(
        "--budget-s", type=float, default=360.0, help="skip optional work past this"
    )
    parser.add_argument(
        "--out", default=None, help="output folder (default $OUT or benchmarks/results)"
    )
    args = parser.parse_args(argv)
    cpu = args.device == "cpu"
    args.preset = args.preset or ("tiny" if cpu else "large")
    args.pretrain_batches = [
        int(b) for b in (args.pretrain_batches or ("1" if cpu else "8,32,64")).split(",")
    ]
    args.finetune_batches = [
        int(b) for b in (args.finetune_batches or ("1" if cpu else "64,128,256")).split(",")
    ]
    return args


ARGS = parse_args()
if ARGS.device == "cpu":
    # The dry run exercises the Triton code path through the interpreter; this must precede the
    # first import of the kernel module.
    os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from vctmae import provenance  # noqa: E402
from vctmae.bench import kernel as kernel_bench  # noqa: E402
from vctmae.bench import report as benchreport  # noqa: E402
from vctmae.kernels import (  # noqa: E402
    gather_patches,
    patch_embed,
    patch_embed_reference,
    stride_frames,
)
from vctmae.kernels.triton_patch_embed import patch_embed_triton  # noqa: E402
from vctmae.model import build_classifier, build_mae, visible_count  # noqa: E402
from vctmae.train.speed import apply_speedups, install_patch_embed  # noqa: E402

START = time.perf_counter()
DEVICE = torch.device(ARGS.device)
CUDA = DEVICE.type == "cuda"
FP32_BOUND = 1e-5  # fp32 dots: sqrt(512)·6e-8 ≈ 1.4e-6 typical; indexing errors are O(1e-2)
BF16_BOUND = 1e-2  # bf16 operands: 2^-9 ≈ 2e-3 relative per operand, ~3e-3 on long sums
NUM_TOKENS = 288
# The dry run shrinks the model further: the Triton interpreter costs ~1 s per 64×64 output tile.
MODEL_OVERRIDES: dict[str, int] = (
    {}
    if CUDA
    else {
        "embed_dim": 64,
        "num_heads": 2,
        "depth": 2,
        "decoder_embed_dim": 32,
        "decoder_num_heads": 2,
        "decoder_depth": 1,
    }
)

RECORD: dict[str, Any] = {
    "correctness": [],
    "peak": {},
    "steps": [],
    "patch_embed": [],
    "launch_configs": [],
    "errors": [],
}


def elapsed() -> float:
    return time.perf_counter() - START


def log(message: str) -> None:
    print(f"[{elapsed():6.1f}s] {message}", flush=True)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    if not torch.isfinite(actual).all():
        return math.inf
    return ((actual - expected).norm() / expected.norm()).item()


def synchronize() -> None:
    if CUDA:
        torch.cuda.synchronize()


def time_ms(fn, *, warmup: int, reps: int) -> float:
    """Median milliseconds of fn() after `warmup` calls (CUDA events on a GPU): the shared timer."""
    return kernel_bench.time_ms(fn, warmup=warmup, reps=reps, device=DEVICE)


def random_crops(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random int16 HU crops spanning beyond the clip window, and frame offsets in [0, 6)."""
    crops = torch.randint(-1500, 1500, (batch, 96, 96, 96), dtype=torch.int16, device=DEVICE)
    return crops, torch.randint(0, 6, (batch,), device=DEVICE)


# ------------------------------------------------------------------------------------------------
# 1. correctness


def check(name: str, error: float, bound: float, **extra: Any) -> None:
    ok = error < bound
    RECORD["correctness"].append(
        {"check": name, "relative_error": error, "bound": bound, "ok": ok, **extra}
    )
    log(f"{'ok  ' if ok else 'FAIL'} {name}: relative error {error:.2e} (bound {bound:.0e})")


def check_kernel(batch: int, dim: int, keep_count: int | None, *, check_fp32: bool = False) -> None:
    crops, offsets = random_crops(batch)
    frames = stride_frames(offsets)  # (B, 16) slice indices o + 6k
    weight = torch.randn(dim, 512, device=DEVICE) * 0.05
    bias = torch.randn(dim, device=DEVICE)
    pos = torch.randn(NUM_TOKENS, dim, device=DEVICE)
    keep = None
    if keep_count is not None:
        keep = torch.argsort(torch.rand(batch, NUM_TOKENS, device=DEVICE), dim=1)[:, :keep_count]
    tokens = NUM_TOKENS if keep is None else keep_count
    grad_out = torch.randn(batch, tokens, dim, device=DEVICE)

    # float64 reference: explicitly gathered patches × weight (layout checked against Conv3d in CI).
    ref_params = [p.double().requires_grad_(True) for p in (weight, bias, pos)]
    patches = gather_patches(crops, frames).double()  # (B, 288, 512)
    ref = patches @ ref_params[0].T + ref_params[1] + ref_params[2]
    if keep is not None:
        ref = ref.gather(1, keep[:, :, None].expand(-1, -1, dim))
    ref.backward(grad_out.double())
    expected = {
        "out": ref.detach(),
        **{n: p.grad for n, p in zip(("weight", "bias", "pos"), ref_params, strict=True)},
    }

    # fp32 dots verify the indexing exactly; on a GPU once (each fp32 variant is a slow JIT compile).
    precisions = ["fp32"] if not CUDA else (["fp32", "bf16"] if check_fp32 else ["bf16"])
    for precision in precisions:
        params = [p.clone().requires_grad_(True) for p in (weight, bias, pos)]
        out = patch_embed_triton(
            crops, frames, *params[:2], keep=keep, pos=params[2], precision=precision
        )
        out.backward(grad_out)
        got = {
            "out": out.detach(),
            **{n: p.grad for n, p in zip(("weight", "bias", "pos"), params, strict=True)},
        }
        bound = FP32_BOUND if precision == "fp32" else BF16_BOUND
        for key in expected:
            check(
                f"kernel B={batch} D={dim} keep={keep_count} {precision} {key}",
                relative_error(got[key], expected[key]),
                bound,
            )
    # The public entry point against the conv reference (auto backend = Triton on CUDA).
    auto = patch_embed(
        crops, frames, weight, bias, keep=keep, pos=pos, backend="triton" if not CUDA else "auto"
    )
    conv = patch_embed_reference(crops, frames, weight, bias, keep=keep, pos=pos)
    check(
        f"patch_embed(auto) vs conv reference B={batch} keep={keep_count}",
        relative_error(auto, conv),
        BF16_BOUND if CUDA else FP32_BOUND,
    )


def model_outputs(model: nn.Module, kind: str, crops, frames, noise, backend: str, autocast: bool):
    """(output, grad of patch_embed.proj.weight) of the model's forward on crops + frame indices
    with one patch-embedding route installed."""
    install_patch_embed(model, backend, DEVICE)
    model.zero_grad(set_to_none=True)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
        if kind == "mae":
            loss, out, _ = model(crops, frames, 0.8, noise=noise)
        else:
            out = model(crops, frames)
            loss = out.float().pow(2).mean()
    loss.backward()
    return out.detach().float(), model.patch_embed.proj.weight.grad.clone()


def check_model_paths() -> None:
    """The model with the Triton vs the torch patch embedding: same weights, same masking noise.

    Reference: the torch route in fp32 with TF32 off. On a GPU the Triton route (fp32 model, bf16
    dots in the patch embedding only) must be no further from it than twice the distance of the
    usual bf16-autocast torch route (floor 1e-3): a yardstick measured in the same run, where a
    fixed bound would have to guess how a random-weight network amplifies rounding. On the CPU
    (interpreter, fp32 dots) the two routes must agree to 1e-4.
    """
    shallow = MODEL_OVERRIDES | {"depth": 2, "decoder_depth": 1}
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        for kind in ("mae", "classifier"):
            if kind == "mae":
                model = build_mae(ARGS.preset, **shallow).to(DEVICE)
            else:
                model = build_classifier(ARGS.preset, head_dropout=0.0, **shallow).to(DEVICE)
            batch = 4 if CUDA else 1
            crops, offsets = random_crops(batch)
            noise = torch.rand(batch, NUM_TOKENS, device=DEVICE)
            args = (model, kind, crops, stride_frames(offsets), noise)
            reference = model_outputs(*args, "torch", autocast=False)
            triton_route = model_outputs(*args, "triton", autocast=False)
            yardstick = model_outputs(*args, "torch", autocast=True)
            for index, what in enumerate(("forward output", "patch_embed.proj.weight grad")):
                error = relative_error(triton_route[index], reference[index])
                if CUDA:
                    bf16_error = relative_error(yardstick[index], reference[index])
                    check(
                        f"{kind} {what} triton vs torch fp32",
                        error,
                        max(2 * bf16_error, 1e-3),
                        torch_bf16_autocast_error=bf16_error,
                    )
                else:
                    check(
                        f"{kind} {what} triton vs torch",
                        error,
                        1e-4,
                        torch_bf16_autocast_error=relative_error(
                            yardstick[index], reference[index]
                        ),
                    )
            del model
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def run_correctness() -> None:
    log("1. correctness")
    if CUDA:
        check_kernel(8, 1024, 57, check_fp32=True)
        check_kernel(8, 1024, None)
        check_kernel(3, 200, 17)  # ragged tiles: D not a multiple of the block, few rows
    else:
        check_kernel(2, 32, 7)
        check_kernel(1, 40, None)
    check_model_paths()


# ------------------------------------------------------------------------------------------------
# 2. peak


def run_peak() -> float:
    log("2. bf16 matmul peak")
    n = 8192 if CUDA else 512
    dtype = torch.bfloat16 if CUDA else torch.float32
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype)
    ms = time_ms(lambda: a @ b, warmup=5, reps=20 if CUDA else 3)
    tflops = 2 * n**3 / (ms * 1e-3) / 1e12
    RECORD["peak"] = {"n": n, "dtype": str(dtype), "median_ms": ms, "tflops": tflops}
    log(f"   {n}³ {dtype}: {ms:.3f} ms → {tflops:.1f} TFLOP/s")
    return tflops


# ------------------------------------------------------------------------------------------------
# 3. training steps


def linear_macs(module: nn.Module) -> int:
    """Σ fan_in·fan_out over the nn.Linear layers of a module."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def training_flops_per_sample(model: nn.Module, kind: str) -> float:
    """Model FLOPs of one training sample (fwd + bwd); see the module docstring for the formula."""
    cfg = model.config
    embed_macs = 512 * cfg.embed_dim  # channel-folded patch embedding (t_patch·patch·patch inputs)
    encoder_block_macs = linear_macs(model.blocks)
    if kind == "mae":
        visible = visible_count(NUM_TOKENS, 0.8)
        n_enc, n_dec = 1 + visible, NUM_TOKENS + int(cfg.decoder_cls)
        macs = (
            embed_macs * visible
            + encoder_block_macs * n_enc
            + linear_macs(model.decoder_embed) * visible
            + linear_macs(model.decoder_blocks) * n_dec
            + linear_macs(model.decoder_pred) * NUM_TOKENS
        )
        attention = (
            cfg.depth * n_enc**2 * cfg.embed_dim
            + cfg.decoder_depth * n_dec**2 * cfg.decoder_embed_dim
        )
    else:
        n_enc = 1 + NUM_TOKENS
        macs = embed_macs * NUM_TOKENS + encoder_block_macs * n_enc + linear_macs(model.head)
        attention = cfg.depth * n_enc**2 * cfg.embed_dim
    return 6.0 * macs + 12.0 * attention


def make_step(model: nn.Module, kind: str, mode: str, batch: int):
    """One training step closure for mode 'bf16' | 'compile' | 'fp32'."""
    fused = CUDA and mode != "fp32"
    if kind == "mae":
        optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=1e-4,
            betas=(0.9, 0.95),
            weight_decay=0.05,
            **({"fused": True} if fused else {"foreach": False}),
        )
    else:
        optimizer = torch.optim.Adam(
            model.parameters(), lr=1e-5, **({"fused": True} if fused else {"foreach": False})
        )
    crops, offsets = random_crops(batch)
    frames = stride_frames(offsets)  # (B, 16) slice indices o + 6k
    labels = torch.randint(0, 2, (batch,), device=DEVICE)

    def loss_of(module: nn.Module) -> torch.Tensor:
        if kind == "mae":
            return module(crops, frames, 0.8)[0]
        return F.cross_entropy(module(crops, frames), labels)

    if mode == "fp32":
        module = apply_speedups(model, patch_embed="torch", compile=False, device=DEVICE)

        def forward() -> torch.Tensor:
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
                return loss_of(module)
    else:
        module = apply_speedups(
            model,
            patch_embed="auto" if CUDA else "triton",
            compile=mode == "compile",
            device=DEVICE,
        )

        def forward() -> torch.Tensor:
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
                return loss_of(module)

    def step() -> None:
        loss = forward()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, optimizer


def time_step(model: nn.Module, kind: str, mode: str, batch: int, peak: float) -> None:
    entry = {"kind": kind, "mode": mode, "batch": batch}
    step = optimizer = None
    try:
        step, optimizer = make_step(model, kind, mode, batch)
        warmup = (3 if mode != "compile" else 2) if CUDA else 1
        reps = (8 if batch <= 64 else 5) if CUDA else 2
        t0 = time.perf_counter()
        for _ in range(warmup):
            step()
        synchronize()
        entry["warmup_s"] = time.perf_counter() - t0
        ms = time_ms(step, warmup=0, reps=reps)
        flops = training_flops_per_sample(model, kind)
        entry.update(
            ms_per_step=ms,
            samples_per_s=batch / (ms * 1e-3),
            tflops_per_sample=flops / 1e12,
            achieved_tflops=flops * batch / (ms * 1e-3) / 1e12,
        )
        entry["mfu"] = entry["achieved_tflops"] / peak
        if CUDA:
            entry["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        log(
            f"   {kind:10s} {mode:7s} B={batch:<4d} {ms:8.1f} ms  {entry['samples_per_s']:8.1f} samples/s  "
            f"MFU {100 * entry['mfu']:5.1f}%"
        )
    except torch.cuda.OutOfMemoryError:
        entry["error"] = "out of memory"
        log(f"   {kind:10s} {mode:7s} B={batch:<4d} out of memory")
    except Exception as error:  # one failing configuration must not end the check
        entry["error"] = f"{type(error).__name__}: {error}"[:2000]
        RECORD["errors"].append(traceback.format_exc()[-4000:])
        log(f"   {kind:10s} {mode:7s} B={batch:<4d} FAILED {entry['error'][:300]}")
    RECORD["steps"].append(entry)
    save()
    # Free this configuration's gradients and optimizer state (also after an out-of-memory error).
    del step, optimizer
    model.zero_grad(set_to_none=True)
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_steps(peak: float) -> None:
    log(f"3. training steps ({ARGS.preset})")
    compile_ok = CUDA and not ARGS.no_compile  # inductor on the CPU would take minutes
    for kind, batches in (("mae", ARGS.pretrain_batches), ("classifier", ARGS.finetune_batches)):
        with torch.device(DEVICE):  # build the parameters on the GPU: ViT-L init on the CPU is slow
            if kind == "mae":
                model = build_mae(ARGS.preset, **MODEL_OVERRIDES)
            else:
                model = build_classifier(ARGS.preset, **MODEL_OVERRIDES)
        model.train()
        for batch in batches:
            time_step(model, kind, "bf16", batch, peak)
        # eager fp32 as the paper code, at the paper batch size
        time_step(model, kind, "fp32", batches[0], peak)
        if compile_ok and elapsed() < ARGS.budget_s - 150:
            time_step(
                model,
                kind,
                "compile",
                batches[-1] if kind == "mae" else batches[min(1, len(batches) - 1)],
                peak,
            )
        elif compile_ok:
            log(
                f"   skip compile for {kind}: {elapsed():.0f}s elapsed of a {ARGS.budget_s:.0f}s budget"
            )
        del model
        if CUDA:
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# 4. patch embedding kernel vs torch path


def build_config_dim() -> int:
    from vctmae.model import preset_config

    return preset_config(ARGS.preset, **MODEL_OVERRIDES).embed_dim


def run_patch_embed_bench() -> None:
    log("4. patch embedding: Triton vs sample_frames + RGB Conv3d")
    dim = build_config_dim()
    if CUDA:
        shapes, warmup, reps = kernel_bench.PAPER_SHAPES, 5, 30
    else:
        shapes = (
            kernel_bench.Shape(name="pretrain", batch=1, keep=7),
            kernel_bench.Shape(name="finetune", batch=1, keep=None),
        )
        warmup, reps = 1, 2
    for shape in shapes:
        rows = kernel_bench.measure(
            shape, dim=dim, device=DEVICE, backend="triton", warmup=warmup, reps=reps
        )
        for row in rows:
            RECORD["patch_embed"].append(row)
            log(
                f"   {row['shape']:8s} B={row['batch']:<3d} {row['pass']:7s} triton {row['candidate_ms']:8.3f} ms  "
                f"torch {row['torch_rgb_ms']:8.3f} ms  speedup {row['speedup']:5.2f}×"
            )


# ------------------------------------------------------------------------------------------------
# 5. launch configurations (data for tuning; only while time remains)

FORWARD_CANDIDATES = [
    {"block_m": 128, "block_n": 128, "block_k": 64, "num_warps": 8, "num_stages": 3},  # the default
    {"block_m": 64, "block_n": 128, "block_k": 64, "num_warps": 4, "num_stages": 3},
    {"block_m": 128, "block_n": 256, "block_k": 64, "num_warps": 8, "num_stages": 3},
    {"block_m": 128, "block_n": 128, "block_k": 128, "num_warps": 8, "num_stages": 2},
]
GRAD_CANDIDATES = [
    {"block_m": 64, "block_n": 128, "block_k": 128, "num_warps": 8, "num_stages": 3},  # the default
    {"block_m": 64, "block_n": 128, "block_k": 64, "num_warps": 4, "num_stages": 3},
    {"block_m": 128, "block_n": 128, "block_k": 128, "num_warps": 8, "num_stages": 2},
]


def run_launch_configs() -> None:
    """Time the forward and grad_weight kernels under a few tile configurations (finetune shape)."""
    if not CUDA:
        return
    if elapsed() > ARGS.budget_s:
        log(
            f"5. skip launch configurations: {elapsed():.0f}s elapsed of a {ARGS.budget_s:.0f}s budget"
        )
        return
    log("5. launch configurations (B=64, D=1024, all tokens)")
    from vctmae.kernels import triton_patch_embed as tpe

    problem = kernel_bench.Problem.random(kernel_bench.PAPER_SHAPES[1], 1024, DEVICE)
    weight = problem.conv.weight.detach().sum(1).flatten(1).contiguous()
    bias = problem.conv.bias.detach()
    frames = problem.frames.to(torch.int32)
    grad_out = torch.randn(problem.crops.shape[0], NUM_TOKENS, 1024, device=DEVICE)

    def forward() -> torch.Tensor:
        return tpe._launch_forward(problem.crops, frames, None, weight, bias, None, True)

    def grad_weight() -> torch.Tensor:
        return tpe._launch_grad_weight(problem.crops, frames, None, grad_out, 1024, True)

    defaults = (tpe.forward_config, tpe.grad_weight_config)
    try:
        for which, candidates, fn in (
            ("forward", FORWARD_CANDIDATES, forward),
            ("grad_weight", GRAD_CANDIDATES, grad_weight),
        ):
            for params in candidates:
                config = tpe.LaunchConfig(**params)
                if which == "forward":
                    tpe.forward_config = lambda dim, c=config: c
                else:
                    tpe.grad_weight_config = lambda dim, c=config: c
                try:
                    ms = time_ms(fn, warmup=3, reps=20)
                    RECORD["launch_configs"].append({"kernel": which, **params, "ms": ms})
                    log(f"   {which:11s} {params} {ms:.4f} ms")
                except Exception as error:  # e.g. out of shared memory for a large tile
                    RECORD["launch_configs"].append(
                        {"kernel": which, **params, "error": str(error)[:500]}
                    )
                    log(f"   {which:11s} {params} failed: {str(error)[:200]}")
    finally:
        tpe.forward_config, tpe.grad_weight_config = defaults


# ------------------------------------------------------------------------------------------------
# report


def summary_table() -> str:
    lines = [
        "",
        "=" * 78,
        f"GPU CHECK — {RECORD['machine'].get('gpu') or RECORD['machine']['cpu']}",
    ]
    failed = [c for c in RECORD["correctness"] if not c["ok"]]
    lines.append(
        f"correctness: {len(RECORD['correctness']) - len(failed)}/{len(RECORD['correctness'])} ok"
        + "".join(f"\n  FAIL {c['check']}: {c['relative_error']:.2e}" for c in failed)
    )
    peak = RECORD["peak"]
    lines.append(
        f"peak: {peak.get('tflops', float('nan')):.1f} TFLOP/s ({peak.get('dtype')} {peak.get('n')}³)"
    )
    lines.append(
        f"{'step':<11}{'mode':<9}{'batch':>6}{'ms/step':>10}{'samples/s':>11}{'TFLOP/s':>9}{'MFU':>7}{'GiB':>6}"
    )
    for s in RECORD["steps"]:
        if "error" in s:
            lines.append(f"{s['kind']:<11}{s['mode']:<9}{s['batch']:>6}  {s['error'][:50]}")
            continue
        lines.append(
            f"{s['kind']:<11}{s['mode']:<9}{s['batch']:>6}{s['ms_per_step']:>10.1f}{s['samples_per_s']:>11.1f}"
            f"{s['achieved_tflops']:>9.1f}{100 * s['mfu']:>6.1f}%{s.get('max_memory_gib', 0):>6.1f}"
        )
    lines.append(f"{'patch embed':<20}{'pass':<9}{'triton ms':>10}{'torch ms':>10}{'speedup':>9}")
    for p in RECORD["patch_embed"]:
        lines.append(
            f"{p['shape'] + ' B=' + str(p['batch']):<20}{p['pass']:<9}{p['candidate_ms']:>10.3f}"
            f"{p['torch_rgb_ms']:>10.3f}{p['speedup']:>8.2f}×"
        )
    lines.append(f"errors: {len(RECORD['errors'])}; total {elapsed():.0f} s")
    return "\n".join(lines)


def bench_results() -> tuple[list[benchreport.Result], dict[str, float]]:
    """The same numbers in the benchreport shape (results + same-run ratios)."""
    results = [
        benchreport.Result(
            name="bf16_matmul_peak", value=RECORD["peak"].get("tflops", 0.0), unit="TFLOP/s"
        )
    ]
    by_key = {}
    for s in RECORD["steps"]:
        if "error" in s:
            continue
        key = f"{s['kind']}_{s['mode']}_b{s['batch']}"
        by_key[key] = s
        results.append(
            benchreport.Result(
                name=f"{key}_samples_per_s", value=s["samples_per_s"], unit="samples/s"
            )
        )
        results.append(benchreport.Result(name=f"{key}_mfu", value=s["mfu"], unit="fraction"))
    ratios = {}
    for kind, batches in (("mae", ARGS.pretrain_batches), ("classifier", ARGS.finetune_batches)):
        base = by_key.get(f"{kind}_fp32_b{batches[0]}")
        best = max(
            (s for s in by_key.values() if s["kind"] == kind and s["mode"] != "fp32"),
            key=lambda s: s["samples_per_s"],
            default=None,
        )
        paper = by_key.get(f"{kind}_bf16_b{batches[0]}")
        if base and paper:
            ratios[f"{kind}_bf16_paper_batch_over_fp32_eager"] = (
                paper["samples_per_s"] / base["samples_per_s"]
            )
        if base and best:
            ratios[f"{kind}_best_over_fp32_eager"] = best["samples_per_s"] / base["samples_per_s"]
    for p in RECORD["patch_embed"]:
        key = f"patch_embed_{p['shape']}_{p['pass'].replace('+', '_')}"
        results.append(benchreport.Result(name=f"{key}_triton", value=p["candidate_ms"], unit="ms"))
        results.append(
            benchreport.Result(name=f"{key}_torch_rgb", value=p["torch_rgb_ms"], unit="ms")
        )
        ratios[f"{key}_triton_over_torch_rgb_speed"] = p["speedup"]
    return results, ratios


def output_path() -> Path:
    out_dir = Path(ARGS.out or os.environ.get("OUT") or Path(__file__).resolve().parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir / ("gpu_check.json" if CUDA else "gpu_check_dryrun.json")


def save() -> None:
    """Write the JSON so far: called after every section and step, so a run cut short keeps its numbers."""
    results, ratios = bench_results()
    RECORD.update(
        benchmark="gpu_check",
        results=[r.as_dict() for r in results],
        ratios=ratios,
        total_s=elapsed(),
    )
    path = output_path()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(RECORD, indent=2, default=str) + "\n")
    tmp.replace(path)


def main() -> int:
    if CUDA and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible (use --device cpu for a dry run)", file=sys.stderr)
        return 2
    RECORD["machine"] = provenance.machine_info()
    RECORD["versions"] = provenance.versions()
    import triton

    RECORD["versions"].update(torch=torch.__version__, triton=triton.__version__)
    RECORD["git_commit"] = provenance.git_commit()
    RECORD["config"] = {k: v for k, v in vars(ARGS).items()} | {
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
    }
    if CUDA:
        props = torch.cuda.get_device_properties(0)
        RECORD["machine"].update(
            sm_count=props.multi_processor_count,
            memory_gib=props.total_memory / 2**30,
            capability=f"{props.major}.{props.minor}",
        )
    log(
        f"device {RECORD['machine'].get('gpu') or 'cpu'}; torch {torch.__version__}; triton {triton.__version__}"
    )
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))

    sections = [
        ("correctness", run_correctness),
        ("peak", run_peak),
        ("steps", None),
        ("patch_embed", run_patch_embed_bench),
        ("launch_configs", run_launch_configs),
    ]
    peak = float("nan")
    for name, fn in sections:
        try:
            if name == "peak":
                peak = run_peak()
            elif name == "steps":
                run_steps(peak)
            else:
                fn()
        except Exception:
            RECORD["errors"].append(f"section {name}:\n" + traceback.format_exc()[-4000:])
            log(f"section {name} FAILED:\n{traceback.format_exc()[-2000:]}")
        save()

    save()
    print(summary_table())
    print(f"wrote {output_path()}")
    failed = [c for c in RECORD["correctness"] if not c["ok"]]
    return 1 if failed or RECORD["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
