"""The training step wrapped for capture (vctmae.train.graph) against the eager `Trainer.train_step`.

On the CPU the wrapped step runs without capture: static copies of its arguments,
the CPU tensors staged through one buffer, the learning rate in a tensor, the
fused optimizer — everything a CUDA graph replays except the replay itself. It
must compute what the eager step computes. The CUDA tests (capture + replay, resume) skip without
a GPU and run in benchmarks/gpu_check.sh.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import (
    assert_same_training,
    run_options,
    run_steps,
    short_trainer,
    stop_before_epoch,
    trainers,
)

from vctmae.synth.phantoms import write_random_shards
from vctmae.train.config import PretrainConfig
from vctmae.train.graph import GraphedStep, tensors_in
from vctmae.train.pretrain import pretrain_trainer


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return write_random_shards(tmp_path_factory.mktemp("graph"), 24, seed=3)


def test_static_pretraining_step_equals_the_eager_step(shards, tmp_path, monkeypatch):
    def make(name):
        run = run_options(shards, tmp_path / name, flip="frames", grad_clip=1.0)
        return short_trainer("pretrain", run)

    eager, static = trainers(make, monkeypatch)
    assert_same_training(eager, static, run_steps(eager, 4, 1), run_steps(static, 4, 1))


def test_static_finetuning_step_with_accumulation_equals_the_eager_step(
    shards, tmp_path, monkeypatch
):
    def make(name):
        return short_trainer("finetune", run_options(shards, tmp_path / name, accum_steps=2))

    eager, static = trainers(make, monkeypatch)
    # Head dropout on: its masks come from torch's global RNG, in the same order in both steps.
    assert eager.run.model.config.head_dropout > 0
    assert_same_training(eager, static, run_steps(eager, 3, 2), run_steps(static, 3, 2))


def test_forward_backward_compiles_as_one_graph(shards, tmp_path):
    """The captured step's forward and backward trace with torch.compile(fullgraph=True):
    nothing in them syncs to the host or branches on data. (The optimizer step is the fused
    kernel; torch.optim's Python `step` always graph-breaks, so it is not compiled.)"""
    import torch._dynamo

    run = run_options(shards, tmp_path / "compiled", flip="frames")
    trainer = pretrain_trainer(PretrainConfig(run=run, epochs=1, warmup_epochs=0, batch_size=4))
    model = trainer.run.model.train()
    batches = [next(iter(trainer.run.loader))]
    draws = [trainer.objective.draw(len(batches[0]), trainer.generator)]
    trainer.forward_backward(batches, draws)
    eager = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        torch.compile(trainer.forward_backward, fullgraph=True, backend="aot_eager")(batches, draws)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, eager[name], rtol=1e-5, atol=1e-7, msg=name)


@dataclasses.dataclass
class _Sample:
    values: torch.Tensor
    flags: torch.Tensor
    name: str
    weight: torch.Tensor | None = None


def test_graphed_step_gives_the_step_static_copies_of_its_arguments():
    """The wrapper on its own: nested lists, dicts and dataclasses of tensors of several dtypes
    reach the step as copies with the same values, in buffers kept while the shapes stay and
    made anew when they change; the step's own function is what runs."""
    seen = []

    def step(samples, extras):
        seen.append((samples, extras))
        total = sum((s.values.double() * s.flags + s.weight[:, None]).sum() for s in samples)
        return total + extras["noise"].sum()

    model = torch.nn.Linear(2, 2)
    graphed = GraphedStep(
        step, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        device=torch.device("cpu"), capture=False, on_fallback=pytest.fail,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(5)

    def arguments(size):
        samples = [
            _Sample(
                torch.randint(-999, 999, (size, 3), dtype=torch.int16, generator=generator),
                torch.rand(size, 3, generator=generator) < 0.5,
                name=f"sample {i}",
                weight=torch.randn(size, generator=generator),
            )
            for i in range(2)
        ]
        return samples, {"noise": torch.rand(size, 7, generator=generator, dtype=torch.float64)}

    buffers = []
    for size in (4, 4, 5):
        given = arguments(size)
        assert torch.equal(graphed(*given), step(*given))
        copies = seen[-2]
        assert [s.name for s in copies[0]] == [s.name for s in given[0]]
        for copy, original in zip(tensors_in(copies), tensors_in(given), strict=True):
            assert torch.equal(copy, original) and copy.dtype == original.dtype
            assert copy.data_ptr() != original.data_ptr()
        buffers.append([copy.data_ptr() for copy in tensors_in(copies)])
    assert buffers[0] == buffers[1] and buffers[1] != buffers[2]


class _BrokenReplay:
    """A captured graph whose replay fails, as a replay of an unusable capture would."""

    def replay(self) -> None:
        raise RuntimeError("CUDA error: operation failed during replay")


@pytest.mark.parametrize("failing", ["capture", "replay"])
def test_a_failed_capture_falls_back_to_the_eager_step(
    shards, tmp_path, monkeypatch, capsys, failing
):
    """Capture (after its warm-up steps) or the first replay raises: the run goes on with the
    eager step, says why once (stderr and the log), and trains exactly as an eager run."""
    from helpers import read_log

    def make(name):
        run = run_options(shards, tmp_path / name, flip="frames", grad_clip=1.0)
        return short_trainer("pretrain", run)

    def capture(warm_up, body, device):
        warm_up()  # the warm-up changes the weights: the fallback must undo it
        if failing == "capture":
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        return _BrokenReplay()

    eager, static = trainers(make, monkeypatch)
    static.graphed.capture = True  # as on CUDA, with the seam below standing in for the capture
    monkeypatch.setattr("vctmae.train.graph.capture_graph", capture)
    losses = run_steps(eager, 4, 1), run_steps(static, 4, 1)
    assert not static.graphed.capture and static.graphed.graph is None
    assert_same_training(eager, static, *losses)
    [line] = [line for line in capsys.readouterr().err.splitlines() if "--cuda-graph" in line]
    assert "capturing the training step failed (RuntimeError: CUDA error" in line
    assert line.endswith("it runs eagerly")
    static.run.log.close()
    records = read_log(tmp_path / "static" / "log.jsonl")
    [record] = [r for r in records if r["event"] == "cuda_graph_fallback"]
    assert record["step"] == 0 and "RuntimeError: CUDA error" in record["message"]


# -- on a GPU -----------------------------------------------------------------------------------


@pytest.mark.cuda
def test_cuda_graph_replay_equals_the_eager_step(shards, tmp_path):
    """Capture + replay against the eager step, in fp32 (bf16 would blur the comparison)."""

    def make(name, cuda_graph):
        run = run_options(
            shards, tmp_path / name, flip="frames", device="cuda", cuda_graph=cuda_graph
        )
        run = dataclasses.replace(run, speed=dataclasses.replace(run.speed, precision="fp32"))
        return short_trainer("pretrain", run)

    eager, captured = make("eager", False), make("graphed", True)
    assert eager.graphed is None and captured.graphed is not None and captured.graphed.capture
    losses = run_steps(eager, 5, 1), run_steps(captured, 5, 1)
    assert captured.graphed.graph is not None
    # TF32 and kernel choices may differ between eager and captured launches: a looser bound.
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    for a, b in zip(eager.run.model.parameters(), captured.run.model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5)


@pytest.mark.cuda
def test_cuda_graph_resume_is_exact(shards, tmp_path, monkeypatch):
    """A graph-captured run interrupted after its first epoch and resumed ends where an
    uninterrupted graph-captured run ends (MAE: all randomness from the CPU generator)."""
    from safetensors.torch import load_file

    from vctmae.train.pretrain import run_pretrain

    def config(out, resume=False):
        run = run_options(
            shards, out, flip="frames", device="cuda", resume=resume, max_steps_per_epoch=2
        )
        return PretrainConfig(run=run, epochs=2, warmup_epochs=0, batch_size=4, preview=False)

    full = run_pretrain(config(tmp_path / "full"))
    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
        stop_before_epoch(patch, 1)
        run_pretrain(config(tmp_path / "cut"))
    resumed = run_pretrain(config(tmp_path / "cut", resume=True))
    assert resumed.state.step == full.state.step
    a, b = load_file(str(full.model_path)), load_file(str(resumed.model_path))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
