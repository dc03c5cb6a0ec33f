"""The epoch loop both trainers share.

One `Trainer` runs epochs of optimizer steps over a loader: gradient
accumulation (with DDP's `no_sync` on the non-final micro-batches), the
per-iteration learning-rate schedule, optional gradient clipping, bf16 autocast
on GPU, a NaN/inf guard, the progress bar and JSONL log, and an atomic
checkpoint after every epoch that `--resume` continues from exactly.

Losses and the NaN flag stay on the device; the host reads them only on
logging steps and at the end of an epoch (the deliberate syncs are marked).
Checkpoints are written at epoch boundaries, so a resumed run restarts the
interrupted epoch from its beginning with the same data order and RNG state.
`--resume` refuses settings that would change what the run computes (see
`config.check_resume_config`) and falls back, with a warning, to the previous
checkpoint when the newest cannot be read.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vctmae.errors import VctmaeError
from vctmae.model.checkpoint import CheckpointError
from vctmae.train import checkpoint
from vctmae.train.config import check_resume_config, config_dict, resume_fingerprint
from vctmae.train.distributed import DistInfo, any_true, barrier, gather_objects
from vctmae.train.runlog import RunLog, training_progress, warn
from vctmae.train.schedule import WarmupCosine, set_lr
from vctmae.train.speed import apply_speedups


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


def autocast_context(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU (no GradScaler needed); full fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def wrap_for_training(
    model: nn.Module, info: DistInfo, *, patch_embed: str, compile: bool
) -> nn.Module:
    """The module the step calls: the chosen patch embedding, optionally compiled, DDP across ranks."""
    module = apply_speedups(model, patch_embed=patch_embed, compile=compile, device=info.device)
    if info.enabled:
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        module = DistributedDataParallel(module, device_ids=device_ids)
    return module


LossFn = Callable[[Any, torch.Generator], torch.Tensor]
EpochHook = Callable[[int, float, TrainState], EpochEnd]


class Trainer:
    """Runs `config.epochs` epochs of `loss_fn` steps; see the module docstring.

    `config` is a PretrainConfig or FinetuneConfig (the shared fields: epochs,
    accum_steps, grad_clip, seed, log_every, resume, progress, out,
    max_steps_per_epoch). `loss_fn(batch, generator)` returns the scalar loss
    of one micro-batch, drawing its randomness (offsets, mirror flags, mask
    noise) from `generator`, whose state is checkpointed per rank.
    """

    def __init__(
        self,
        *,
        name: str,
        config: Any,
        info: DistInfo,
        model: nn.Module,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: WarmupCosine,
        loader: Any,
        steps_per_epoch: int,
        loss_fn: LossFn,
        log: RunLog,
        epoch_end: EpochHook | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.info = info
        self.model = model
        self.module = module
        self.optimizer = optimizer
        self.schedule = schedule
        self.loader = loader
        self.steps_per_epoch = steps_per_epoch
        self.loss_fn = loss_fn
        self.log = log
        self.epoch_end = epoch_end
        self.state = TrainState()
        # Per-rank stream of training randomness (offsets, mirror, mask noise).
        self.generator = torch.Generator().manual_seed(config.seed * 1000 + info.rank)
        self.run_dir = Path(config.out)
        # What --resume compares: the settings that decide data order, schedule and model.
        self.fingerprint = resume_fingerprint(config)

    # -- checkpoints ---------------------------------------------------------------
    def _state_dict(self) -> dict[str, Any]:
        generator_states = gather_objects(self.generator.get_state())
        state = asdict(self.state)
        state.update(
            optimizer=self.optimizer.state_dict(),
            torch_rng=torch.get_rng_state(),
            cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            generators=generator_states,
            world_size=self.info.world_size,
            loader_epoch=self.state.epoch,
            config=config_dict(self.config),
            fingerprint=self.fingerprint,
        )
        return state

    def _save(self) -> None:
        state = self._state_dict()  # collective: every rank takes part
        if self.info.is_main:
            checkpoint.save_checkpoint(
                self.run_dir, model=self.model, state=state, epoch=self.state.epoch
            )
        barrier()

    def _load_checkpoint(self) -> tuple[checkpoint.CheckpointFiles, dict[str, Any]] | None:
        """The newest readable checkpoint (state, weights loaded into the model), or None.

        A newest pair that cannot be read falls back to the previous one with a warning; a
        config that changed what the run computes is refused outright (no fallback).
        """
        candidates = checkpoint.checkpoint_candidates(self.run_dir)
        first_error: CheckpointError | None = None
        for files in candidates:
            try:
                saved = checkpoint.load_state(files.state)
                check_resume_config(
                    saved.get("fingerprint", saved["config"]),
                    self.fingerprint if "fingerprint" in saved else config_dict(self.config),
                    where=files.state,
                )
                checkpoint.load_weights_into(self.model, files.weights)
            except CheckpointError as error:
                first_error = first_error or error
                continue
            if first_error is not None and self.info.is_main:
                message = (
                    f"{first_error}; resuming from the previous checkpoint "
                    f"{files.weights.name} (epoch {files.epoch}) instead"
                )
                warn(message)
                self.log.write("checkpoint_fallback", message=message, epoch=files.epoch)
            return files, saved
        if first_error is not None:
            raise first_error
        return None

    def resume(self) -> bool:
        """Restore the last readable checkpoint of `config.out`; False when there is none."""
        found = self._load_checkpoint()
        if found is None:
            return False
        files, saved = found
        self.optimizer.load_state_dict(saved["optimizer"])
        for key in (
            "step",
            "epoch",
            "best_metric",
            "best_epoch",
            "bad_epochs",
            "stopped_early",
            "history",
        ):
            setattr(self.state, key, saved[key])
        torch.set_rng_state(saved["torch_rng"])
        if saved["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        if saved["world_size"] == self.info.world_size:
            self.generator.set_state(saved["generators"][self.info.rank])
        else:
            # A different world size cannot replay the same per-rank streams.
            self.generator.manual_seed(
                self.config.seed * 1000 + self.info.rank + 7919 * self.state.epoch
            )
        self.log.write(
            "resume", epoch=self.state.epoch, step=self.state.step, checkpoint=str(files.weights)
        )
        return True

    # -- the loop ------------------------------------------------------------------
    def _raise_if_nonfinite(self, flag: torch.Tensor, epoch: int) -> None:
        # Deliberate sync (logging steps and epoch ends only).
        if bool(any_true(flag).item()):
            found = checkpoint.latest_checkpoint(self.run_dir)
            kept = (
                f"last good checkpoint kept: {found[0]}"
                if found
                else "no checkpoint had been written yet"
            )
            message = (
                f"{self.name}: loss became NaN/inf in epoch {epoch + 1} (by optimizer step {self.state.step}); "
                f"stopped without saving — {kept}. Try a lower learning rate or --grad-clip."
            )
            self.log.write("nonfinite_loss", epoch=epoch, step=self.state.step, message=message)
            raise NonFiniteLossError(message)

    def fit(self) -> TrainState:
        cfg = self.config
        device = self.info.device
        accum = cfg.accum_steps
        ddp = isinstance(self.module, DistributedDataParallel)
        world = self.info.world_size
        progress = training_progress(enabled=cfg.progress and self.info.is_main)
        with progress:
            for epoch in range(self.state.epoch, cfg.epochs):
                if self.state.stopped_early:
                    break
                task = progress.add_task(
                    f"{self.name} {epoch + 1}/{cfg.epochs}",
                    total=self.steps_per_epoch,
                    rate=0.0,
                    loss="…",
                    lr=self.schedule(self.state.step),
                )
                self.loader.set_epoch(epoch)
                self.model.train()
                loss_sum = torch.zeros((), device=device)
                nonfinite = torch.zeros((), dtype=torch.bool, device=device)
                micro, steps, samples = 0, 0, 0
                start = time.perf_counter()
                for batch in self.loader:
                    if steps == self.steps_per_epoch:
                        break
                    final_micro = (micro + 1) % accum == 0
                    sync_context = (
                        self.module.no_sync()
                        if ddp and not final_micro
                        else contextlib.nullcontext()
                    )
                    with sync_context:
                        with autocast_context(device):
                            loss = self.loss_fn(batch, self.generator)
                        (loss / accum).backward()
                    detached = loss.detach().float()
                    nonfinite |= ~torch.isfinite(detached)
                    loss_sum += detached
                    micro += 1
                    samples += len(batch.keys)
                    if not final_micro:
                        continue
                    lr = self.schedule(self.state.step)
                    set_lr(self.optimizer, lr)
                    if cfg.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.state.step += 1
                    steps += 1
                    rate = samples * world / max(time.perf_counter() - start, 1e-9)
                    progress.update(task, advance=1, rate=rate, lr=lr)
                    if steps % cfg.log_every == 0 or steps == self.steps_per_epoch:
                        self._raise_if_nonfinite(nonfinite, epoch)
                        loss_value = float(detached.item())  # deliberate sync: logging step
                        progress.update(task, loss=f"{loss_value:.4f}")
                        self.log.write(
                            "step",
                            epoch=epoch,
                            step=self.state.step,
                            loss=loss_value,
                            lr=lr,
                            samples_per_s=rate,
                        )
                if steps == 0:
                    raise RuntimeError(
                        f"{self.name}: epoch {epoch + 1} produced no optimizer step "
                        f"(fewer than batch_size × accum_steps samples on this rank?)"
                    )
                self._raise_if_nonfinite(nonfinite, epoch)
                if dist.is_initialized():
                    dist.all_reduce(loss_sum)
                mean_loss = float(loss_sum.item()) / (micro * world)  # deliberate sync: epoch end
                elapsed = time.perf_counter() - start
                self.state.epoch = epoch + 1
                hook = (
                    self.epoch_end(epoch, mean_loss, self.state) if self.epoch_end else EpochEnd()
                )
                record = {"epoch": epoch + 1, "loss": mean_loss, **hook.metrics}
                self.state.history.append(record)
                if hook.stop:
                    self.state.stopped_early = True
                self._save()
                self.log.write(
                    "epoch",
                    **record,
                    step=self.state.step,
                    seconds=elapsed,
                    samples_per_s=samples * world / max(elapsed, 1e-9),
                )
                progress.update(task, loss=f"{mean_loss:.4f}")
        return self.state
