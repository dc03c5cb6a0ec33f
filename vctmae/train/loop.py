"""The training step and the epoch loop both trainers share.

`Trainer.train_step(micro_batches)` is one optimizer step — the unit the
benchmarks time: the step's randomness is drawn on the host, then
`Trainer.step_body`, the device's work, is written once and runs as it is or
captured in a CUDA graph (`vctmae.train.graph.GraphedStep`). `Trainer.fit` is
the epoch loop around it: progress bar, JSONL log, NaN/inf guard, the epoch
hook and a checkpoint after every epoch.

Losses and the NaN flag stay on the device; the host reads them only on
logging steps and at the end of an epoch (the deliberate syncs are marked).
Checkpoints are written at epoch boundaries, so a resumed run restarts the
interrupted epoch from its beginning with the same data order and RNG state.
`--resume` refuses settings and shards that would change what the run computes,
and falls back, with a warning, to the previous checkpoint when the newest
cannot be read.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vctmae.clip import ClipRule
from vctmae.data.shards import ShardError, shard_identity
from vctmae.errors import UsageError, VctmaeError
from vctmae.infer.config import config_dict
from vctmae.infer.device import autocast_context
from vctmae.infer.distributed import any_true, barrier, gather_objects
from vctmae.model.checkpoint import CheckpointError, load_weights, model_files
from vctmae.progress import progress_bar, warn
from vctmae.train import checkpoint
from vctmae.train.config import absolute_shard, check_resume_config, resume_fingerprint
from vctmae.train.graph import GraphedStep
from vctmae.train.run import Run
from vctmae.train.schedule import set_lr


class NonFiniteLossError(VctmaeError, RuntimeError):
    """The training loss became NaN or infinite; the run stopped without saving."""


@dataclass(kw_only=True)
class TrainState:
    """Everything about progress that a resumed run must restore."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # epochs completed
    best_metric: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    stopped_early: bool = False
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class EpochEnd:
    """What an epoch hook reports back: metrics to log, and whether to stop."""

    metrics: dict[str, float] = field(default_factory=dict)
    stop: bool = False


class Objective(Protocol):
    """A trainer's loss, in two parts so that the step's randomness is explicit.

    `draw` takes the micro-batch's randomness (frame offsets, mirror flags, mask noise) from the
    seeded per-rank CPU generator — the same numbers whatever device or speed-up runs the step,
    and exactly replayed after `--resume`; `loss` computes the scalar loss on the device.
    """

    def draw(self, size: int, generator: torch.Generator) -> dict[str, torch.Tensor]: ...

    def loss(
        self, module: nn.Module, batch: Any, draws: dict[str, torch.Tensor]
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class StepMetrics:
    """What one optimizer step reports: the sum of its micro-batch losses (a device tensor,
    read by the host only on logging steps), how many micro-batches and samples it took."""

    loss_sum: torch.Tensor
    micro_batches: int
    samples: int


EpochHook = Callable[[int, float, TrainState], EpochEnd]


class Trainer:
    """Runs the epochs of a `Run` with an `Objective`; see the module docstring.

    `epoch_end(epoch, mean_loss, state)` runs after each epoch (validation, best weights,
    previews) and may ask to stop early. `other_shards`: the indexes of shards the run reads
    besides its training shards (validation), whose contents `--resume` compares too.
    """

    def __init__(
        self,
        run: Run,
        objective: Objective,
        epoch_end: EpochHook | None = None,
        *,
        log_fields: dict[str, Any] | None = None,
        clip_rule: ClipRule | None = None,
        other_shards: Sequence[Any] = (),
    ) -> None:
        self.run = run
        self.objective = objective
        self.epoch_end = epoch_end
        # A classifier's clip rule, recorded with every checkpoint of its weights.
        self.clip_rule = clip_rule
        # Extra fields of the run's start record (e.g. the class weights).
        self.log_fields = dict(log_fields or {})
        self.state = TrainState()
        info = run.info
        # Per-rank stream of training randomness (offsets, mirror, mask noise).
        self.generator = torch.Generator().manual_seed(run.options.seed * 1000 + info.rank)
        # What --resume compares: the settings that decide data order, schedule and model, and
        # the shards' contents (by absolute path, as the fingerprint names them).
        self.fingerprint = resume_fingerprint(run.config)
        self.shard_indexes = [*run.loader.indexes, *other_shards]
        self.shard_identities = {
            absolute_shard(index.source or index.path): shard_identity(index)
            for index in self.shard_indexes
        }
        # `step_body` on static buffers, graph-captured on CUDA (None: it runs as it is).
        self.graphed: GraphedStep | None = None
        if run.graph_blocker is None:
            self.graphed = GraphedStep(
                self.step_body,
                model=run.model,
                optimizer=run.optimizer,
                device=info.device,
                capture=info.device.type == "cuda",
                on_fallback=self._capture_failed,
            )
        elif run.options.cuda_graph and info.device.type == "cuda" and info.is_main:
            warn(f"--cuda-graph: {run.graph_blocker}")

    # -- checkpoints ---------------------------------------------------------------
    def _state_dict(self) -> dict[str, Any]:
        generator_states = gather_objects(self.generator.get_state())
        state = asdict(self.state)
        state.update(
            optimizer=self.run.optimizer.state_dict(),
            torch_rng=torch.get_rng_state(),
            cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            generators=generator_states,
            world_size=self.run.info.world_size,
            config=config_dict(self.run.config),
            fingerprint=self.fingerprint,
            shards=self.shard_identities,
        )
        return state

    def _save(self) -> None:
        """Checkpoint this epoch: the state is gathered now (a collective), written in the
        background by `run.writer` while the next epoch trains."""
        run = self.run
        state = self._state_dict()  # collective: every rank takes part
        if run.info.is_main:
            run.writer.submit(
                checkpoint.save_checkpoint,
                run.out,
                kind=run.name,
                model=model_files(run.model, clip=self.clip_rule),
                state=checkpoint.cpu_copy(state),
                epoch=self.state.epoch,
            )
        barrier()

    def _load_checkpoint(self) -> tuple[checkpoint.CheckpointFiles, dict[str, Any]] | None:
        """The newest readable checkpoint (state, weights loaded into the model), or None.

        A newest pair that cannot be read falls back to the previous one with a warning; a
        config that changed what the run computes is refused outright (no fallback).
        """
        candidates = checkpoint.checkpoint_candidates(self.run.out, self.run.name)
        first_error: CheckpointError | None = None
        for files in candidates:
            try:
                saved = checkpoint.load_state(files.state)
                check_resume_config(saved["fingerprint"], self.fingerprint, where=files.state)
                self._check_world_size(saved, files.state)
                self._check_shards(saved)
                load_weights(self.run.model, files.weights, strict=True)
            except CheckpointError as error:
                first_error = first_error or error
                continue
            if first_error is not None and self.run.info.is_main:
                message = (
                    f"{first_error}; resuming from the previous checkpoint "
                    f"{files.weights.name} (epoch {files.epoch}) instead"
                )
                warn(message)
                self.run.log.write("checkpoint_fallback", message=message, epoch=files.epoch)
            return files, saved
        if first_error is not None:
            raise first_error
        return None

    def _check_world_size(self, saved: dict[str, Any], where: Path) -> None:
        """Refuse another number of processes: it deals the shards and batches to other ranks
        (another data order), changes the global batch and the steps per epoch (another
        schedule), and has no per-rank random streams to continue from."""
        if saved["world_size"] != self.run.info.world_size:
            raise UsageError(
                f"{where}: --resume with {self.run.info.world_size} process(es), but the run was "
                f"saved by {saved['world_size']}: that changes its data order and schedule — "
                f"resume with {saved['world_size']} (torchrun --nproc_per_node), or start a "
                "new run in another --out"
            )

    def _check_shards(self, saved: dict[str, Any]) -> None:
        """Refuse a shard whose contents changed under its name since the run was saved: other
        crops, another number of steps, another data order (the settings are equal)."""
        named = [index.source or index.path for index in self.shard_indexes]
        paths = {absolute_shard(path): path for path in named}
        # A state saved without shard identities cannot be compared: taken as it is.
        before = saved.get("shards", self.shard_identities)
        for key in sorted(set(before) | set(self.shard_identities)):
            old, new = before.get(key), self.shard_identities.get(key)
            if old == new:
                continue
            if old is None or new is None:
                change = (
                    "had no usable crops when the run was saved"
                    if old is None
                    else "has no usable crops now"
                )
            else:
                change = (
                    ", ".join(
                        f"{name} {old[name]} → {new[name]}"
                        for name in ("crops", "bytes")
                        if old[name] != new[name]
                    )
                    or "same size, another index (other keys, classes or metadata)"
                )
            raise ShardError(
                paths.get(key, key),
                f"changed since the run was saved ({change}); --resume continues a run on the "
                "shards it was trained on — restore them, or start a new run in another --out",
            )

    def resume(self) -> bool:
        """Restore the last readable checkpoint of `config.out`; False when there is none."""
        found = self._load_checkpoint()
        if found is None:
            return False
        files, saved = found
        self.run.optimizer.load_state_dict(saved["optimizer"])
        # The progress fields `_state_dict` saved: those of `TrainState`.
        for key in asdict(self.state):
            setattr(self.state, key, saved[key])
        torch.set_rng_state(saved["torch_rng"])
        if saved["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        self.generator.set_state(saved["generators"][self.run.info.rank])
        self.run.log.write(
            "resume", epoch=self.state.epoch, step=self.state.step, checkpoint=str(files.weights)
        )
        return True

    def start(self) -> None:
        """Resume when asked and a checkpoint exists; otherwise log the run's start record."""
        run = self.run
        if run.options.resume:
            if self.resume():
                return
            if run.info.is_main:
                warn(
                    f"--resume: no {run.name} checkpoint under {run.out}; starting the run "
                    "from its first epoch"
                )
        run.log.start(
            command=run.name,
            config=config_dict(run.config),
            world_size=run.info.world_size,
            device=str(run.info.device),
            steps_per_epoch=run.steps_per_epoch,
            shards=len(run.shards),
            init=str(run.init_report) if run.init_report is not None else None,
            peak_lr=run.schedule.peak_lr,
            **self.log_fields,
        )

    # -- the loop ------------------------------------------------------------------
    def _raise_if_nonfinite(self, flag: torch.Tensor, epoch: int) -> None:
        run = self.run
        # Deliberate sync (logging steps and epoch ends only).
        if bool(any_true(flag).item()):
            # The checkpoint a pending write is about to make current is the last good one.
            run.writer.wait(raise_errors=False)
            found = checkpoint.checkpoint_candidates(run.out, run.name)
            kept = (
                f"last good checkpoint kept: {found[0].weights}"
                if found
                else "no checkpoint had been written yet"
            )
            message = (
                f"{run.name}: loss became NaN/inf in epoch {epoch + 1} (by optimizer step {self.state.step}); "
                f"stopped without saving — {kept}. Try a lower learning rate or --grad-clip."
            )
            run.log.write("nonfinite_loss", epoch=epoch, step=self.state.step, message=message)
            raise NonFiniteLossError(message)

    def train_step(self, micro_batches: Sequence[Any]) -> StepMetrics:
        """One optimizer step over `micro_batches` (gradient accumulation); no host sync.

        The step's randomness is drawn here, on the CPU, from the seeded per-rank generator (the
        same numbers on any device and after `--resume`); the device's work is `step_body`.
        """
        micro_batches = list(micro_batches)
        draws = [self.objective.draw(len(batch), self.generator) for batch in micro_batches]
        set_lr(self.run.optimizer, self.run.schedule(self.state.step))
        step = self.step_body if self.graphed is None else self.graphed
        loss_sum = step(micro_batches, draws)
        self.state.step += 1
        samples = sum(len(batch) for batch in micro_batches)
        return StepMetrics(loss_sum=loss_sum, micro_batches=len(micro_batches), samples=samples)

    def step_body(
        self, micro_batches: list[Any], draws: list[dict[str, torch.Tensor]]
    ) -> torch.Tensor:
        """The device's part of one optimizer step: `forward_backward`, gradient clipping, the
        optimizer step. The eager step runs it as it is; `GraphedStep` captures it."""
        run = self.run
        loss_sum = self.forward_backward(micro_batches, draws)
        if run.options.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.options.grad_clip)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        return loss_sum

    def forward_backward(
        self, micro_batches: list[Any], draws: list[dict[str, torch.Tensor]]
    ) -> torch.Tensor:
        """Forward and backward of every micro-batch; returns the sum of their losses (a device
        scalar). Nothing here reads a value back to the host or branches on data (a CUDA graph
        captures it; a test compiles it with `torch.compile(fullgraph=True)`)."""
        run = self.run
        device, accum = run.info.device, len(micro_batches)
        ddp = isinstance(run.module, DistributedDataParallel)
        loss_sum = torch.zeros((), device=device)
        for index, (batch, drawn) in enumerate(zip(micro_batches, draws, strict=True)):
            last = index == accum - 1
            # Only the last micro-batch's backward all-reduces the gradients across ranks.
            sync = run.module.no_sync() if ddp and not last else contextlib.nullcontext()
            with sync:
                drawn = {name: value.to(device, non_blocking=True) for name, value in drawn.items()}
                # No weight-cast cache: a graph would replay a cast made once, and the weights
                # change every step (a ViT casts each weight once per forward anyway).
                with autocast_context(device, run.options.speed.precision, cache=False):
                    loss = self.objective.loss(run.module, batch, drawn)
                (loss / accum).backward()
            loss_sum += loss.detach().float()
        return loss_sum

    def _capture_failed(self, error: Exception) -> None:
        """Say once, on stderr and in the log, why the step runs eagerly from now on."""
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        message = f"--cuda-graph: capturing the training step failed ({reason}); it runs eagerly"
        if self.run.info.is_main:
            warn(message)
        self.run.log.write("cuda_graph_fallback", step=self.state.step, message=message)

    def _mean_over_ranks(self, total: torch.Tensor, count: int) -> float:
        """Mean of a per-rank sum over `count` micro-batches each, across ranks."""
        if dist.is_initialized():
            total = total.clone()
            dist.all_reduce(total)
        # Deliberate sync: logging steps and epoch ends only.
        return float(total.item()) / (count * self.run.info.world_size)

    def fit(self) -> TrainState:
        """Train the remaining epochs; every write the run started is finished on return."""
        try:
            self._epochs()
        except BaseException:
            # Finish what was being written (its error must not hide this one).
            self.run.writer.close(raise_errors=False)
            raise
        self.run.writer.close()
        return self.state

    def finish(self, **fields: Any) -> None:
        """Log the run's end record (its epoch, step and `fields`), close the log, wait for
        every rank."""
        self.run.log.write("end", epoch=self.state.epoch, step=self.state.step, **fields)
        self.run.log.close()
        barrier()

    def _epochs(self) -> None:
        run = self.run
        options = run.options
        epochs, per_epoch = run.config.epochs, run.steps_per_epoch
        device, world = run.info.device, run.info.world_size
        progress = progress_bar(
            "[bold]{task.description}",
            "{task.fields[rate]:>7.1f} samples/s",
            "loss {task.fields[loss]}",
            "lr {task.fields[lr]:.2e}",
            enabled=options.progress and run.info.is_main,
        )
        with progress:
            for epoch in range(self.state.epoch, epochs):
                if self.state.stopped_early:
                    break
                task = progress.add_task(
                    f"{run.name} {epoch + 1}/{epochs}",
                    total=per_epoch,
                    rate=0.0,
                    loss="…",
                    lr=run.schedule(self.state.step),
                )
                run.loader.set_epoch(epoch)
                run.model.train()
                epoch_loss = torch.zeros((), device=device)
                window_loss = torch.zeros((), device=device)
                nonfinite = torch.zeros((), dtype=torch.bool, device=device)
                micro = window_micro = steps = samples = 0
                start = time.perf_counter()
                batches = iter(run.loader)
                while steps < per_epoch:
                    micro_batches = list(itertools.islice(batches, options.accum_steps))
                    if len(micro_batches) < options.accum_steps:
                        break
                    lr = run.schedule(self.state.step)
                    metrics = self.train_step(micro_batches)
                    nonfinite |= ~torch.isfinite(metrics.loss_sum)
                    epoch_loss += metrics.loss_sum
                    window_loss += metrics.loss_sum
                    micro += metrics.micro_batches
                    window_micro += metrics.micro_batches
                    samples += metrics.samples
                    steps += 1
                    rate = samples * world / max(time.perf_counter() - start, 1e-9)
                    progress.update(task, advance=1, rate=rate, lr=lr)
                    if steps % options.log_every == 0 or steps == per_epoch:
                        self._raise_if_nonfinite(nonfinite, epoch)
                        loss_value = self._mean_over_ranks(window_loss, window_micro)
                        window_loss.zero_()
                        window_micro = 0
                        progress.update(task, loss=f"{loss_value:.4f}")
                        run.log.write(
                            "step",
                            epoch=epoch,
                            step=self.state.step,
                            loss=loss_value,
                            lr=lr,
                            samples_per_s=rate,
                        )
                if steps == 0:
                    raise RuntimeError(
                        f"{run.name}: epoch {epoch + 1} produced no optimizer step "
                        f"(fewer than batch_size × accum_steps samples on this rank?)"
                    )
                self._raise_if_nonfinite(nonfinite, epoch)
                mean_loss = self._mean_over_ranks(epoch_loss, micro)
                elapsed = time.perf_counter() - start
                self.state.epoch = epoch + 1
                # The previous epoch's writes are done before this epoch's hook writes again.
                run.writer.wait()
                hook = (
                    self.epoch_end(epoch, mean_loss, self.state) if self.epoch_end else EpochEnd()
                )
                record = {"epoch": epoch + 1, "loss": mean_loss, **hook.metrics}
                self.state.history.append(record)
                if hook.stop:
                    self.state.stopped_early = True
                last = epoch + 1 == epochs or self.state.stopped_early
                if last or (epoch + 1) % options.checkpoint_every == 0:
                    self._save()
                run.log.write(
                    "epoch",
                    **record,
                    step=self.state.step,
                    seconds=elapsed,
                    samples_per_s=samples * world / max(elapsed, 1e-9),
                )
                progress.update(task, loss=f"{mean_loss:.4f}")
