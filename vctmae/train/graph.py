"""A training step run on static buffers, captured once in a CUDA graph and replayed (`--cuda-graph`).

At the paper's batch (8) a ViT-L MAE step is host-bound: thousands of kernel
launches of a few microseconds each, while the GPU work is a few milliseconds.
Capturing the whole step — forward, backward, gradient clipping, optimizer step
— into one CUDA graph turns those launches into one.

`GraphedStep(step, ...)` wraps the trainer's own step function, `step(*args)`,
which returns a device tensor; the step is not rewritten here. A graph replays
fixed kernels on fixed memory, so the wrapper keeps static copies of the
arguments' tensors (the same lists, dicts and dataclasses, with tensors allocated
once) and copies each call's arguments into them: tensors already on the device
one by one, those on the CPU (the step's randomness, drawn from a seeded CPU
generator so that the numbers and `--resume` stay exact) through one pinned
staging buffer in one asynchronous copy. The step must neither read a value back
to the host nor branch on data; the caller makes its optimizer `capturable`
(learning rate and step counters as device tensors).

Capturing needs a few eager warm-up steps (on a side stream, as CUDA requires);
they would change the weights, so parameters, optimizer state and the CUDA RNG
are saved before and restored after.

Without capture (`capture=False`, on a CPU) the step runs eagerly on the static
copies; that is how the CPU tests show the copies feed the step what it was
given. That is also where a run goes when capture or the first replay raises:
the weights, optimizer state and RNG go back to the snapshot taken before the
warm-up, the step runs eagerly from then on, and `on_fallback(error)` is told
once. A failed capture never stops a run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch

WARMUP_STEPS = 3  # eager steps before capture (CUDA needs the allocator and kernels warmed)
_ALIGN = 16  # bytes: every staged tensor starts at an offset any dtype can view


def tensors_in(value: Any) -> list[torch.Tensor]:
    """The tensors in `value` (nested lists, tuples, dicts and dataclasses), in a fixed order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        items = value
    elif isinstance(value, dict):
        items = value.values()
    elif dataclasses.is_dataclass(value):
        items = [getattr(value, field.name) for field in dataclasses.fields(value)]
    else:
        return []
    return [tensor for item in items for tensor in tensors_in(item)]


def with_tensors(value: Any, tensors: Iterator[torch.Tensor]) -> Any:
    """`value` with its tensors replaced, in the order of `tensors_in`, by the next of `tensors`."""
    if isinstance(value, torch.Tensor):
        return next(tensors)
    if isinstance(value, list | tuple):
        return type(value)(with_tensors(item, tensors) for item in value)
    if isinstance(value, dict):
        return {key: with_tensors(item, tensors) for key, item in value.items()}
    if dataclasses.is_dataclass(value):
        fields = dataclasses.fields(value)
        return dataclasses.replace(
            value, **{f.name: with_tensors(getattr(value, f.name), tensors) for f in fields}
        )
    return value


def _nbytes(tensor: torch.Tensor) -> int:
    """Bytes `tensor` takes in the staging buffer, rounded up to the alignment."""
    return -(-tensor.numel() * tensor.element_size() // _ALIGN) * _ALIGN


def _view(buffer: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    """The bytes of `buffer` from `offset`, viewed with the dtype and shape of `like`."""
    nbytes = like.numel() * like.element_size()
    return buffer[offset : offset + nbytes].view(like.dtype).view(like.shape)


class GraphedStep:
    """`step(*args)`, a training step of `model` and `optimizer`, run on static copies of its
    arguments; `capture=True` records it once as a CUDA graph and replays it."""

    def __init__(
        self,
        step: Callable[..., torch.Tensor],
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        capture: bool,
        on_fallback: Callable[[Exception], None],
    ) -> None:
        self.step = step
        self.model = model
        self.optimizer = optimizer
        self.device = device
        self.capture = capture
        self.on_fallback = on_fallback
        self.graph: torch.cuda.CUDAGraph | None = None
        # The arguments' structure and shapes the static copies were made for.
        self.shape_key: tuple | None = None
        # What the step changes, as it was before the warm-up: kept until the first replay of
        # a new graph has run, so that a failed capture or replay can be undone.
        self._before: dict[str, Any] | None = None

    # -- static arguments ----------------------------------------------------------------------

    def _allocate(self, args: tuple, tensors: list[torch.Tensor]) -> None:
        pinned = self.device.type == "cuda"
        size = max(sum(_nbytes(t) for t in tensors if t.is_cpu), 1)
        self.staging = torch.empty(size, dtype=torch.uint8, pin_memory=pinned)
        self.staged = torch.empty(size, dtype=torch.uint8, device=self.device)
        self.copied = torch.cuda.Event() if pinned else None
        # Each tensor's place in the staging buffer (None: a device tensor, copied to its slot).
        self.offsets: list[int | None] = []
        slots, offset = [], 0
        for tensor in tensors:
            if tensor.is_cpu:
                self.offsets.append(offset)
                slots.append(_view(self.staged, offset, tensor))
                offset += _nbytes(tensor)
            else:
                self.offsets.append(None)
                slots.append(torch.empty_like(tensor))
        self.slots = slots
        # What the step reads in the graph: the arguments' structure around the static tensors.
        self.static_args = with_tensors(args, iter(slots))
        self.shape_key = _key(tensors)

    def _load(self, tensors: list[torch.Tensor]) -> None:
        """Copy the arguments' tensors into the static ones (the CPU ones in one copy)."""
        if self.copied is not None:
            # The previous step's copy must have left the pinned buffer before it is rewritten.
            self.copied.synchronize()
        for slot, offset, tensor in zip(self.slots, self.offsets, tensors, strict=True):
            if offset is None:
                slot.copy_(tensor, non_blocking=True)
            else:
                _view(self.staging, offset, tensor).copy_(tensor)
        self.staged.copy_(self.staging, non_blocking=True)
        if self.copied is not None:
            self.copied.record()

    # -- the step ------------------------------------------------------------------------------

    def __call__(self, *args: Any) -> torch.Tensor:
        """Run the step on `args`; returns what it returns (a copy: the graph reuses its memory)."""
        tensors = tensors_in(args)
        if self.shape_key != _key(tensors):
            # New shapes (e.g. another accumulation): new static copies, captured again.
            self.graph = None
            self._allocate(args, tensors)
        self._load(tensors)
        if self.capture:
            try:
                self._replay()
                return self.output.clone()
            except Exception as error:
                self._fall_back(error)
        return self.step(*self.static_args)

    # -- capture -------------------------------------------------------------------------------

    def _replay(self) -> None:
        """Replay the graph, capturing it first when there is none for these shapes."""
        if self.graph is not None:
            self.graph.replay()
            return
        self._before = _snapshot(self.model, self.optimizer)
        self.graph = capture_graph(self._warm_up, self._record, self.device)
        self.graph.replay()
        if self.device.type == "cuda":
            # Deliberate sync, once per capture: a replay that fails says so here.
            torch.cuda.current_stream(self.device).synchronize()
        self._before = None

    def _record(self) -> None:
        """The step on the static arguments; its result stays in the graph's memory."""
        self.output = self.step(*self.static_args)

    def _warm_up(self) -> None:
        """The eager steps capture needs first; what they changed is then put back."""
        for _ in range(WARMUP_STEPS):
            self.step(*self.static_args)
        _restore(self.model, self.optimizer, self._before)
        # Capture starts without gradients: the graph's backward allocates its own.
        self.optimizer.zero_grad(set_to_none=True)

    def _fall_back(self, error: Exception) -> None:
        """Undo what the failed capture or replay changed; run eagerly from now on."""
        self.capture, self.graph = False, None
        self.optimizer.zero_grad(set_to_none=True)
        if self._before is not None:
            _restore(self.model, self.optimizer, self._before)
            self._before = None
        self.on_fallback(error)


def _key(tensors: list[torch.Tensor]) -> tuple:
    """What the static copies depend on: each tensor's shape, dtype and side (CPU or device)."""
    return tuple((tuple(t.shape), t.dtype, t.is_cpu) for t in tensors)


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
