"""The training step on static buffers, captured once in a CUDA graph and replayed (`--cuda-graph`).

At the paper's batch (8) a ViT-L MAE step is host-bound: thousands of kernel
launches of a few microseconds each, while the GPU work is a few milliseconds.
Capturing the whole step — forward, backward, gradient clipping, optimizer step
and the loss accumulator — into one CUDA graph turns those launches into one.

A graph replays fixed kernels on fixed memory, so everything the step reads or
writes lives in buffers allocated once (`StaticStep`):

- the micro-batches' crops and labels are copied into device slots;
- the step's randomness (view shifts, flip flags, mask noise — the
  objective's `draw`, from the same seeded CPU generator as the eager step, so
  the numbers and `--resume` stay exact) is written into one pinned staging
  buffer and sent to the device in one asynchronous copy;
- the learning rate is a device tensor the schedule fills before each replay,
  the optimizer is fused and `capturable` (its step counters on the device);
- gradients stay allocated in the graph's memory; clipping uses the foreach
  path (no host sync); autocast's weight cache is off (a cached cast would be
  captured once and never refreshed).

Capturing needs a few eager warm-up steps (on a side stream, as CUDA requires);
they would change the weights, so parameters, optimizer state and the CUDA RNG
are saved before and restored after. Graphs are single-process here: with DDP
(`torchrun`) the step runs eagerly (the trainer says so once).

Without capture (`capture=False`, on a CPU) the same static step runs eagerly;
that is how the CPU tests show it computes what the eager `Trainer.train_step`
computes. That is also where a run goes when capture or the first replay raises:
the weights, optimizer state and RNG go back to the snapshot taken before the
warm-up, the step runs eagerly from then on, and the run says why in one line
(printed and logged). A failed capture never stops a run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vctmae.data import Batch
from vctmae.train.schedule import set_lr

WARMUP_STEPS = 3  # eager steps before capture (CUDA needs the allocator and kernels warmed)
_ALIGN = 16  # bytes: every staged draw starts at an offset any dtype can view


@dataclass(frozen=True)
class _Draw:
    """Where one named draw of every micro-batch lives in the staging buffers."""

    name: str
    shape: tuple[int, ...]  # (accum, *per-micro-batch shape)
    dtype: torch.dtype
    offset: int
    nbytes: int


def capture_blocker(options: Any, info: Any) -> str | None:
    """Why this run's step cannot be graph-captured (None: it can)."""
    if info.device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if info.enabled:
        return "graphs are single-process here; under torchrun (DDP) the step runs eagerly"
    if options.loader.backend == "dali":
        return "the DALI loader owns its own device buffers; the step runs eagerly"
    from vctmae.model.config import preset_config

    if preset_config(options.model, **options.model_fields()).volume:
        return "the 3-D model's step has not been checked under capture; it runs eagerly"
    return None


class StaticStep:
    """`Trainer.train_step` on static buffers; `capture=True` records it once as a CUDA graph."""

    def __init__(self, trainer: Any, *, capture: bool) -> None:
        self.trainer = trainer
        self.capture = capture
        self.device = trainer.info.device
        self.graph: torch.cuda.CUDAGraph | None = None
        self.shape_key: tuple | None = None
        # What the step changes, as it was before the warm-up: kept until the first replay of
        # a new graph has run, so that a failed capture or replay can be undone.
        self._before: dict[str, Any] | None = None

    # -- buffers -------------------------------------------------------------------------------

    def _allocate(self, micro_batches: list[Batch], draws: list[dict[str, torch.Tensor]]) -> None:
        accum, device = len(micro_batches), self.device
        first = micro_batches[0]
        self.crops = torch.empty(
            (accum, *first.crops.shape), dtype=first.crops.dtype, device=device
        )
        self.labels = torch.empty(
            (accum, *first.labels.shape), dtype=first.labels.dtype, device=device
        )
        # The mask boxes too (`--frames mask` reads them in the step), when the batches have them.
        self.boxes = (
            None
            if first.boxes is None
            else torch.empty((accum, *first.boxes.shape), dtype=first.boxes.dtype, device=device)
        )
        self.batches = [
            Batch(
                self.crops[i],
                self.labels[i],
                keys=[],
                boxes=None if self.boxes is None else self.boxes[i],
            )
            for i in range(accum)
        ]
        layout, offset = [], 0
        for name, tensor in draws[0].items():
            nbytes = accum * tensor.numel() * tensor.element_size()
            layout.append(_Draw(name, (accum, *tensor.shape), tensor.dtype, offset, nbytes))
            offset += -(-nbytes // _ALIGN) * _ALIGN
        self.layout = layout
        pinned = device.type == "cuda"
        self.staging = torch.empty(max(offset, 1), dtype=torch.uint8, pin_memory=pinned)
        self.staged = torch.empty(max(offset, 1), dtype=torch.uint8, device=device)
        self.copied = torch.cuda.Event() if pinned else None
        # Views of the device copy: what the objective reads in the captured step.
        self.draws = [{d.name: self._view(self.staged, d)[i] for d in layout} for i in range(accum)]
        self.loss_sum = torch.zeros((), device=device)
        self.shape_key = self._key(micro_batches, draws)

    @staticmethod
    def _view(buffer: torch.Tensor, draw: _Draw) -> torch.Tensor:
        return buffer[draw.offset : draw.offset + draw.nbytes].view(draw.dtype).view(draw.shape)

    @staticmethod
    def _key(micro_batches: list[Batch], draws: list[dict[str, torch.Tensor]]) -> tuple:
        return (
            len(micro_batches),
            tuple(micro_batches[0].crops.shape),
            tuple((name, tuple(t.shape), t.dtype) for name, t in draws[0].items()),
        )

    def load(self, micro_batches: list[Batch]) -> None:
        """Copy the batches into the slots and stage the step's randomness (one copy)."""
        trainer = self.trainer
        draws = [trainer.objective.draw(len(batch), trainer.generator) for batch in micro_batches]
        if self.shape_key != self._key(micro_batches, draws):
            if self.graph is not None:
                # A new shape (e.g. the last, smaller batches of evaluation never come here; a
                # different accumulation does): capture again for it.
                self.graph = None
            self._allocate(micro_batches, draws)
        for slot, batch in zip(self.batches, micro_batches, strict=True):
            slot.crops.copy_(batch.crops, non_blocking=True)
            slot.labels.copy_(batch.labels, non_blocking=True)
            if slot.boxes is not None:
                slot.boxes.copy_(batch.boxes, non_blocking=True)
        if self.copied is not None:
            # The previous step's copy must have left the pinned buffer before it is rewritten.
            self.copied.synchronize()
        for draw in self.layout:
            view = self._view(self.staging, draw)
            for i, drawn in enumerate(draws):
                view[i].copy_(drawn[draw.name])
        self.staged.copy_(self.staging, non_blocking=True)
        if self.copied is not None:
            self.copied.record()

    # -- the step ------------------------------------------------------------------------------

    def forward_backward(self) -> None:
        """Forward and backward of every micro-batch in the slots; the losses summed into
        `loss_sum`. Nothing here reads a value back to the host or branches on data (a CPU test
        compiles it with `torch.compile(fullgraph=True)`)."""
        from vctmae.train.loop import autocast_context

        trainer = self.trainer
        accum = len(self.batches)
        self.loss_sum.zero_()
        for batch, draws in zip(self.batches, self.draws, strict=True):
            with autocast_context(self.device, trainer.options.speed.precision, cache=False):
                loss = trainer.objective.loss(trainer.module, batch, draws)
            (loss / accum).backward()
            self.loss_sum += loss.detach().float()

    def _body(self) -> None:
        """`forward_backward`, gradient clipping, the optimizer step: what is captured."""
        trainer = self.trainer
        self.forward_backward()
        if trainer.options.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(
                trainer.model.parameters(), trainer.options.grad_clip, foreach=True
            )
        trainer.optimizer.step()

    def __call__(self, micro_batches: list[Batch]) -> torch.Tensor:
        """Run one optimizer step; returns the sum of the micro-batch losses (device scalar)."""
        trainer = self.trainer
        self.load(micro_batches)
        set_lr(trainer.optimizer, trainer.schedule(trainer.state.step))
        if self.capture:
            try:
                self._replay()
                return self.loss_sum.clone()
            except Exception as error:  # noqa: BLE001 - any failure of capture: run eagerly
                self._fall_back(error)
        self._body()
        trainer.optimizer.zero_grad(set_to_none=True)
        return self.loss_sum.clone()

    # -- capture -------------------------------------------------------------------------------

    def _replay(self) -> None:
        """Replay the graph, capturing it first when there is none for these shapes."""
        trainer = self.trainer
        if self.graph is not None:
            self.graph.replay()
            return
        self._before = _snapshot(trainer.model, trainer.optimizer)
        self.graph = capture_graph(self._warm_up, self._body, self.device)
        self.graph.replay()
        if self.device.type == "cuda":
            # Deliberate sync, once per capture: a replay that fails says so here.
            torch.cuda.current_stream(self.device).synchronize()
        self._before = None

    def _warm_up(self) -> None:
        """The eager steps capture needs first; what they changed is then put back."""
        trainer = self.trainer
        for _ in range(WARMUP_STEPS):
            self._body()
            trainer.optimizer.zero_grad(set_to_none=True)
        _restore(trainer.model, trainer.optimizer, self._before)
        trainer.optimizer.zero_grad(set_to_none=True)

    def _fall_back(self, error: Exception) -> None:
        """Undo what the failed capture or replay changed; run eagerly from now on, saying why."""
        from vctmae.progress import warn

        trainer = self.trainer
        self.capture, self.graph = False, None
        trainer.optimizer.zero_grad(set_to_none=True)
        if self._before is not None:
            _restore(trainer.model, trainer.optimizer, self._before)
            self._before = None
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        message = f"--cuda-graph: capturing the training step failed ({reason}); it runs eagerly"
        if trainer.info.is_main:
            warn(message)
        trainer.log.write("cuda_graph_fallback", step=trainer.state.step, message=message)


def capture_graph(
    warm_up: Callable[[], None], body: Callable[[], None], device: torch.device
) -> torch.cuda.CUDAGraph:
    """`warm_up()` on a side stream (as CUDA requires), then `body()` captured into a graph."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        warm_up()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph


def _snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Copies of what warm-up steps change: parameters, optimizer state, the CUDA RNG."""
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "state": {
            id(p): {
                k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()
            }
            for group in optimizer.param_groups
            for p in group["params"]
            if p in optimizer.state
        },
        "cuda_rng": torch.cuda.get_rng_state_all(),
    }


def _restore(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]
) -> None:
    """Put back the snapshot in place (same tensors: a graph keeps their addresses). Optimizer
    state the warm-up created afresh goes back to a fresh state: zeros, step 0."""
    with torch.no_grad():
        for param, value in zip(model.parameters(), saved["params"], strict=True):
            param.copy_(value)
        for group in optimizer.param_groups:
            for param in group["params"]:
                before = saved["state"].get(id(param), {})
                for key, value in optimizer.state.get(param, {}).items():
                    if not torch.is_tensor(value):
                        continue
                    if key in before:
                        value.copy_(before[key])
                    else:
                        value.zero_()
    torch.cuda.set_rng_state_all(saved["cuda_rng"])
