"""Triton patch embedding vs its torch reference.

The Triton checks run in subprocesses: TRITON_INTERPRET=1 must be set before
the kernel module is imported, and the GPU-target compile must run without
it, so neither may leak into the other tests of this process.

Tolerances (fp32 under the interpreter): every output element is a dot
product of 512 patch values in [0, 1] with N(0, 1) weights, plus a bias; in
fp32 (unit roundoff 6e-8) the relative error of such a sum is about
sqrt(512)·6e-8 ≈ 1.4e-6 typically and below 512·6e-8 ≈ 3e-5 in the worst
case; measured: ~4e-7. We require ‖out − ref‖ / ‖ref‖ < 2e-5, far below the
O(1) error of any indexing mistake (one wrong voxel in a patch moves a token
by ~1e-2 relative). grad_weight sums B·K such products per element: same bound.
On a GPU the dots take bf16 operands (8 mantissa bits, relative rounding
2^-9 ≈ 2e-3 per operand, random in sign, so ~3e-3 on a long sum): < 1e-2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vctmae.kernels import patch_embed, patch_embed_reference, resolve_backend

REPO = Path(__file__).resolve().parents[1]
FP32_BOUND = 2e-5
BF16_BOUND = 1e-2


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert torch.isfinite(actual).all(), "non-finite values"
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def random_frames(batch: int, generator: torch.Generator) -> torch.Tensor:
    """Per-sample slice indices (B, 16): any increasing 16 of the 96 slices, not only o + 6k."""
    return torch.stack(
        [torch.randperm(96, generator=generator)[:16].sort().values for _ in range(batch)]
    )


def random_inputs(
    batch: int,
    dim: int,
    keep: int | None,
    pos: bool,
    generator: torch.Generator,
    frame_size: int = 96,
    slices: int = 96,
) -> dict:
    """HU values beyond both ends of the [-1000, 1000] window so the clip is exercised.

    frame_size 224: the 96² slices padded to 224² frames (1568 tokens); slices 16: a pre-gathered
    clip (B, 16, 96, 96), as the trainers pass when they cut or flip frames.
    """
    crops = torch.randint(
        -1500, 1500, (batch, slices, 96, 96), dtype=torch.int16, generator=generator
    )
    tokens = 8 * (frame_size // 16) ** 2
    frames = (
        random_frames(batch, generator)
        if slices == 96
        else torch.stack([torch.randperm(slices, generator=generator) for _ in range(batch)])
    )
    inputs = {
        "crops": crops,
        "frames": frames,
        "weight": torch.randn(dim, 512, generator=generator),
        "bias": torch.randn(dim, generator=generator),
        "keep": None,
        "pos": torch.randn(tokens, dim, generator=generator) if pos else None,
        "frame_size": frame_size,
    }
    if keep is not None:
        inputs["keep"] = torch.stack(
            [torch.randperm(tokens, generator=generator)[:keep] for _ in range(batch)]
        )
    return inputs


def run_with_grads(embed, inputs: dict, grad_out: torch.Tensor, **options) -> dict:
    """The output of `embed` (the reference, the dispatcher or the Triton entry point) on
    `inputs`, and its gradients for weight, bias and pos after backpropagating `grad_out`."""
    params = {
        name: inputs[name].clone().requires_grad_(True)
        for name in ("weight", "bias", "pos")
        if inputs[name] is not None
    }
    out = embed(
        inputs["crops"],
        inputs["frames"],
        params["weight"],
        params["bias"],
        keep=inputs["keep"],
        pos=params.get("pos"),
        **options,
    )
    out.backward(grad_out)
    return {"out": out.detach(), **{f"grad_{name}": p.grad for name, p in params.items()}}


def reference_with_grads(inputs: dict, grad_out: torch.Tensor) -> dict[str, torch.Tensor]:
    return run_with_grads(patch_embed_reference, inputs, grad_out, frame_size=inputs["frame_size"])


def on_cuda(inputs: dict) -> dict:
    return {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


# (batch, dim, kept tokens, pos, frame size, slices): dim 40 leaves a partly masked column tile;
# 3×5 rows a partial row tile; frame size 224 the padded 14×14 grid (with and without keep, the
# kept tokens drawn from all 1568, so most are padding-only and some straddle nothing: the pad
# is patch-aligned at 64 = 4·16); 16 slices a pre-gathered clip.
CASES = [
    (2, 32, None, False, 96, 96),
    (2, 32, None, True, 96, 96),
    (3, 40, 5, True, 96, 96),
    (2, 32, 7, False, 96, 96),
    (1, 24, None, True, 224, 96),
    (2, 40, 90, True, 224, 96),
    (2, 32, 9, True, 96, 16),
]

INTERPRETER_SCRIPT = """
import os, sys, torch
assert os.environ["TRITON_INTERPRET"] == "1"
from vctmae.kernels import patch_embed
cases = torch.load(sys.argv[1], weights_only=False)
results = []
for inputs, grad_out in cases:
    params = {n: inputs[n].clone().requires_grad_(True) for n in ("weight", "bias", "pos") if inputs[n] is not None}
    out = patch_embed(inputs["crops"], inputs["frames"], params["weight"], params["bias"],
                      keep=inputs["keep"], pos=params.get("pos"), backend="triton",
                      frame_size=inputs["frame_size"])
    out.backward(grad_out)
    results.append({"out": out.detach(), **{f"grad_{n}": p.grad for n, p in params.items()}})
torch.save(results, sys.argv[2])
"""


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault(
        "TRITON_DEFAULT_FP_FUSION", "1"
    )  # silences Triton 3.9's notice; 1 is its default
    env.update(extra)
    return env


def test_triton_interpreter_matches_reference(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    cases = []
    for batch, dim, keep, pos, frame_size, slices in CASES:
        inputs = random_inputs(batch, dim, keep, pos, generator, frame_size, slices)
        tokens = 8 * (frame_size // 16) ** 2 if keep is None else keep
        cases.append((inputs, torch.randn(batch, tokens, dim, generator=generator)))
    torch.save(cases, tmp_path / "cases.pt")
    subprocess.run(
        [
            sys.executable,
            "-c",
            INTERPRETER_SCRIPT,
            str(tmp_path / "cases.pt"),
            str(tmp_path / "out.pt"),
        ],
        check=True,
        env=_clean_env(TRITON_INTERPRET="1"),
        timeout=300,
    )
    results = torch.load(tmp_path / "out.pt", weights_only=False)
    for (inputs, grad_out), got, case in zip(cases, results, CASES, strict=True):
        expected = reference_with_grads(inputs, grad_out)
        assert set(got) == set(expected), case
        assert got["out"].shape == expected["out"].shape, case
        for name in expected:
            error = relative_error(got[name], expected[name])
            assert error < FP32_BOUND, f"{case} {name}: relative error {error:.2e}"


COMPILE_SCRIPT = """
import os, sys, torch
assert os.environ["TRITON_INTERPRET"] == "1"
from vctmae.kernels import patch_embed
crops, frames, weight, bias, keep = torch.load(sys.argv[1], weights_only=False)

def loss(weight, bias):
    return patch_embed(crops, frames, weight, bias, keep=keep, backend="triton").pow(2).sum()

results = []
# fullgraph: the custom op must trace with no graph break, forward and backward.
for fn in (loss, torch.compile(loss, backend="aot_eager", fullgraph=True)):
    w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    value = fn(w, b)
    value.backward()
    results.append((value.detach(), w.grad, b.grad))
torch.save(results, sys.argv[2])
"""


def test_triton_path_under_torch_compile(tmp_path: Path) -> None:
    """torch.compile(fullgraph=True) traces through the kernel's custom op; values and grads unchanged."""
    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    inputs = random_inputs(2, 16, 6, False, generator)
    torch.save(
        [inputs[k] for k in ("crops", "frames", "weight", "bias", "keep")], tmp_path / "in.pt"
    )
    subprocess.run(
        [sys.executable, "-c", COMPILE_SCRIPT, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
        check=True,
        env=_clean_env(TRITON_INTERPRET="1"),
        timeout=300,
    )
    eager, compiled = torch.load(tmp_path / "out.pt", weights_only=False)
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    reference = patch_embed_reference(
        inputs["crops"], inputs["frames"], inputs["weight"], inputs["bias"], keep=inputs["keep"]
    )
    assert relative_error(eager[0], reference.pow(2).sum()) < FP32_BOUND


OPCHECK_SCRIPT = """
import os, sys, torch
assert os.environ["TRITON_INTERPRET"] == "1"
import vctmae.kernels.triton_patch_embed  # registers the custom ops
crops, frames, weight, bias, keep, pos = torch.load(sys.argv[1], weights_only=False)
frames, keep = frames.int(), keep.int()
weight.requires_grad_(True)
bias.requires_grad_(True)
pos.requires_grad_(True)
grad_out = torch.randn(crops.shape[0], keep.shape[1], weight.shape[0])
checks = {
    "patch_embed keep+pos": (torch.ops.vctmae.patch_embed, (crops, frames, weight, bias, keep, pos, False, 96)),
    "patch_embed all tokens": (torch.ops.vctmae.patch_embed, (crops, frames, weight, bias, None, None, False, 96)),
    "patch_embed 224 frames": (torch.ops.vctmae.patch_embed, (crops, frames, weight, bias, keep, None, False, 224)),
    "grad_weight": (torch.ops.vctmae.patch_embed_grad_weight, (crops, frames, keep, grad_out, False, 96)),
}
for name, (op, args) in checks.items():
    result = torch.library.opcheck(op, args)
    failed = {test: outcome for test, outcome in result.items() if outcome != "SUCCESS"}
    assert not failed, (name, failed)
print("opcheck ok")
"""


def test_custom_ops_pass_opcheck(tmp_path: Path) -> None:
    """The kernel's torch.library ops: schema, fake (meta) implementation, autograd registration
    and AOT dispatch all agree with the real op (torch.library.opcheck, under the interpreter)."""
    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    inputs = random_inputs(1, 16, 4, True, generator)
    torch.save(
        [inputs[k] for k in ("crops", "frames", "weight", "bias", "keep", "pos")],
        tmp_path / "in.pt",
    )
    run = subprocess.run(
        [sys.executable, "-c", OPCHECK_SCRIPT, str(tmp_path / "in.pt")],
        env=_clean_env(TRITON_INTERPRET="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0 and "opcheck ok" in run.stdout, run.stderr[-3000:]


def test_compiles_for_sm80_and_sm90_without_a_gpu(tmp_path: Path) -> None:
    """Real Triton lowering (TTGIR → LLIR → PTX → cubin) for A100 and H100 targets, no interpreter."""
    run = subprocess.run(
        [sys.executable, str(REPO / "tests" / "kernel_aot.py"), "80", "90"],
        check=True,
        env=_clean_env(TRITON_CACHE_DIR=str(tmp_path)),  # a real compile, not a cache hit
        capture_output=True,
        text=True,
        timeout=600,
    )
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert {r["arch"] for r in results} == {"sm_80", "sm_90"}
    assert len(results) >= 12
    # Both frame sizes, forward and grad_weight, for both targets.
    for arch in ("sm_80", "sm_90"):
        names = {r["variant"] for r in results if r["arch"] == arch}
        for frame in (96, 224):
            assert any(n.startswith(f"forward frame={frame} ") for n in names), names
            assert any(n.startswith(f"grad_weight frame={frame} ") for n in names), names
    for r in results:
        assert "ptx" in r["stages"], r
        # The bf16 dot must lower to tensor-core instructions: wgmma on Hopper, mma.sync on Ampere.
        assert r["mma"] == ("wgmma" if r["arch"] == "sm_90" else "mma.sync"), r
        if r["cubin_bytes"] is not None:
            assert r["cubin_bytes"] > 0 and 0 < r["shared_bytes"] <= 160 * 1024, r


def test_reference_layout_matches_explicit_indexing() -> None:
    """Token t*36 + row*6 + col, patch vector (u, p, q) = crop[frames[2t + u], 16 row + p, 16 col + q]."""
    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    inputs = random_inputs(2, 24, None, False, generator)
    crops, frames, weight, bias = (
        inputs["crops"],
        inputs["frames"],
        inputs["weight"],
        inputs["bias"],
    )
    tokens = patch_embed_reference(crops, frames, weight, bias)
    for _ in range(6):
        b = int(torch.randint(0, 2, (1,), generator=generator))
        t, row, col = (int(torch.randint(0, n, (1,), generator=generator)) for n in (8, 6, 6))
        tube = torch.stack(
            [
                crops[
                    b, int(frames[b, 2 * t + u]), 16 * row : 16 * row + 16, 16 * col : 16 * col + 16
                ]
                for u in (0, 1)
            ]
        )
        vector = ((tube.float().clamp(-1000, 1000) + 1000) / 2000).reshape(512)
        token = t * 36 + row * 6 + col
        torch.testing.assert_close(tokens[b, token], weight @ vector + bias, rtol=1e-5, atol=1e-4)


def test_reference_224_frames_hold_the_96_slices_centred_in_padding() -> None:
    """Table 2 row 5: on the 8×14×14 grid the central 6×6 tokens of each frame pair are the 96²
    path's tokens; every other token sees only padding (−1000 HU → 0), so it is the bias (+pos)."""
    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    inputs = random_inputs(2, 24, None, True, generator, frame_size=224)
    small = patch_embed_reference(
        inputs["crops"], inputs["frames"], inputs["weight"], inputs["bias"]
    )  # (B, 288, D)
    big = patch_embed_reference(
        inputs["crops"], inputs["frames"], inputs["weight"], inputs["bias"], pos=inputs["pos"]
    )  # (B, 1568, D): the frame size follows pos
    assert big.shape == (2, 1568, 24)
    grid = (big - inputs["pos"]).reshape(2, 8, 14, 14, 24)
    torch.testing.assert_close(grid[:, :, 4:10, 4:10].reshape(2, 288, 24), small)
    outside = torch.ones(14, 14, dtype=torch.bool)
    outside[4:10, 4:10] = False
    padding = grid[:, :, outside]  # (B, 8, 160, D)
    torch.testing.assert_close(padding, inputs["bias"].expand_as(padding))


def test_reference_keep_and_pos_select_tokens() -> None:
    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    inputs = random_inputs(2, 16, 9, True, generator)
    full = patch_embed_reference(
        inputs["crops"], inputs["frames"], inputs["weight"], inputs["bias"]
    )
    kept = patch_embed_reference(
        **{k: inputs[k] for k in ("crops", "frames", "weight", "bias", "keep", "pos")}
    )
    expected = torch.stack(
        [full[b, inputs["keep"][b]] + inputs["pos"][inputs["keep"][b]] for b in range(2)]
    )
    torch.testing.assert_close(kept, expected)


def test_backend_selection_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cuda", torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    inputs = random_inputs(1, 16, None, False, generator)
    from vctmae.kernels import triton_patch_embed

    monkeypatch.setattr(triton_patch_embed, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        patch_embed(
            inputs["crops"], inputs["frames"], inputs["weight"], inputs["bias"], backend="triton"
        )
    monkeypatch.setattr(triton_patch_embed, "INTERPRET", True)
    with pytest.raises(ValueError, match="frame indices"):
        beyond = inputs["frames"].clone()
        beyond[0, -1] = 96
        triton_patch_embed.patch_embed_triton(
            inputs["crops"], beyond, inputs["weight"], inputs["bias"]
        )
    with pytest.raises(ValueError, match="frames must be"):
        triton_patch_embed.patch_embed_triton(
            inputs["crops"], torch.tensor([3]), inputs["weight"], inputs["bias"]
        )
    with pytest.raises(ValueError, match="weight"):
        triton_patch_embed.patch_embed_triton(
            inputs["crops"], inputs["frames"], inputs["weight"][:, :100], inputs["bias"]
        )


@pytest.mark.cuda
@pytest.mark.parametrize(
    "keep,pos,frame_size", [(None, False, 96), (57, True, 96), (313, True, 224), (None, True, 224)]
)
def test_cuda_bf16_matches_reference(keep: int | None, pos: bool, frame_size: int) -> None:
    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    inputs = random_inputs(4, 256, keep, pos, generator, frame_size=frame_size)
    tokens = 8 * (frame_size // 16) ** 2 if keep is None else keep
    grad_out = torch.randn(4, tokens, 256, generator=generator)
    expected = reference_with_grads(inputs, grad_out)
    got = run_with_grads(patch_embed, on_cuda(inputs), grad_out.cuda(), frame_size=frame_size)
    for name in expected:
        error = relative_error(got[name].cpu(), expected[name])
        assert error < BF16_BOUND, f"{name}: relative error {error:.2e}"


@pytest.mark.cuda
@pytest.mark.parametrize("batch,dim,keep", [(8, 1024, 57), (3, 200, 17), (2, 64, None)])
def test_cuda_fp32_dots_match_reference(batch: int, dim: int, keep: int | None) -> None:
    """fp32 dots on the GPU: the indexing exact to fp32 rounding (ragged tiles: D = 200, 3×17 rows)."""
    from vctmae.kernels.triton_patch_embed import patch_embed_triton

    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    inputs = random_inputs(batch, dim, keep, True, generator)
    tokens = 288 if keep is None else keep
    grad_out = torch.randn(batch, tokens, dim, generator=generator)
    expected = reference_with_grads(inputs, grad_out)
    got = run_with_grads(patch_embed_triton, on_cuda(inputs), grad_out.cuda(), precision="fp32")
    for name in expected:
        error = relative_error(got[name].cpu(), expected[name])
        assert error < FP32_BOUND, f"{name}: relative error {error:.2e}"


def test_kernel_benchmark_measures_both_paths(tmp_path: Path) -> None:
    from vctmae.bench.kernel import Shape, measure, run_kernel_benchmark

    rows = measure(
        Shape(name="pretrain", batch=1, keep=5),
        dim=16,
        device=torch.device("cpu"),
        backend="torch",
        warmup=0,
        reps=1,
    )
    assert [r["pass"] for r in rows] == ["fwd", "fwd+bwd"]
    assert all(r["candidate_ms"] > 0 and r["torch_rgb_ms"] > 0 for r in rows)
    if not torch.cuda.is_available():
        path = run_kernel_benchmark(json_path=tmp_path / "kernel.json", quick=True, dim=16)
        report = json.loads(path.read_text())
        assert report["benchmark"] == "kernel" and report["config"]["gpu_present"] is False
        assert len(report["ratios"]) == 4 and all(v > 0 for v in report["ratios"].values())


def test_ptx_only_fallback_when_ptxas_is_missing(tmp_path: Path) -> None:
    """Without ptxas the compile check still lowers to PTX (Triton internals; kept working here)."""
    run = subprocess.run(
        [sys.executable, str(REPO / "tests" / "kernel_aot.py"), "90", "--ptx-only"],
        check=True,
        env=_clean_env(TRITON_CACHE_DIR=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert results and all(r["stages"][-1] == "ptx" and r["mma"] == "wgmma" for r in results)
