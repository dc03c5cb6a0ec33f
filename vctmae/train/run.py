"""The set-up both trainers share: `build_run(config, ...)` returns the parts of a run.

Process group and device, the JSONL log, the shard list and training loader, the
model (seeded, moved, started from `--init`), the optimizer, the per-iteration
schedule and the module the step calls (patch embedding, compilation, DDP). A
trainer then adds only its objective (`vctmae.train.loop.Objective`) and its
epoch hook.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vctmae.infer import distributed
from vctmae.infer.config import SpeedOptions
from vctmae.infer.device import apply_speedups
from vctmae.infer.distributed import DistInfo
from vctmae.runlog import RunLog
from vctmae.train.checkpoint import BackgroundWriter
from vctmae.train.config import FinetuneConfig, PretrainConfig, RunOptions, check_min_lr
from vctmae.train.optim import build_optimizer
from vctmae.train.schedule import WarmupCosine


@dataclass(frozen=True, kw_only=True)
class Run:
    """Everything a training run is made of, before its first step."""

    name: str
    config: PretrainConfig | FinetuneConfig
    info: DistInfo
    log: RunLog
    shards: list[str]
    loader: Any  # ShardLoader
    model: nn.Module
    module: nn.Module  # what the step calls: `model` with speed-ups, in DDP across ranks
    optimizer: torch.optim.Optimizer
    schedule: WarmupCosine
    steps_per_epoch: int
    init_report: Any
    # Why the step is not graph-captured (None: it is; `capture_blocker`).
    graph_blocker: str | None
    # Checkpoints and weights are written by this thread, off the training step.
    writer: BackgroundWriter

    @property
    def options(self) -> RunOptions:
        return self.config.run

    @property
    def out(self) -> Path:
        return Path(self.config.run.out)


def capture_blocker(options: RunOptions, info: DistInfo) -> str | None:
    """Why this run's step cannot be graph-captured (None: it can; `vctmae.train.graph`)."""
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


def wrap_for_training(model: nn.Module, info: DistInfo, speed: SpeedOptions) -> nn.Module:
    """The module the step calls: the chosen patch embedding, optionally compiled, DDP across ranks."""
    module = apply_speedups(
        model, patch_embed=speed.patch_embed, compile=speed.compile, device=info.device
    )
    if info.enabled:
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        module = DistributedDataParallel(module, device_ids=device_ids)
    return module


def build_run(
    config: PretrainConfig | FinetuneConfig, *, name: str, make_model: Callable[[], nn.Module]
) -> Run:
    """Set up a training run of `config`; `make_model()` builds the model (seeded here)."""
    from vctmae.data.frames import check_crop_shape
    from vctmae.data.shards import ShardError, expand_shards, shard_label
    from vctmae.model import load_init

    run = config.run
    info = distributed.setup(run.device)
    peak = config.peak_lr(info.world_size)
    # Pretraining's peak follows from --blr and the run's size, known only now.
    check_min_lr(config.min_lr, peak, "--blr × batch × processes × accum / 256")
    log = RunLog(Path(run.out) / "log.jsonl", enabled=info.is_main)
    shards = expand_shards(list(run.shards))
    loader = run.loader.build(
        shards, batch_size=config.batch_size, training=True, device=info.device, seed=run.seed
    )
    torch.manual_seed(run.seed)
    model = make_model().to(info.device)
    check_crop_shape(loader.indexes[0], model.config)
    init_report = load_init(model, run.init, run.pos_init) if run.init is not None else None
    # Optimizer steps per epoch: whole accumulations of micro-batches, at most the cap.
    per_epoch = min(len(loader) // run.accum_steps, run.max_steps_per_epoch or len(loader))
    if per_epoch < 1:
        raise ShardError(
            shard_label(shards),
            f"{len(loader)} batches per epoch on this rank, fewer than --accum-steps "
            f"{run.accum_steps}; use fewer processes or a smaller --batch-size",
        )
    blocker = capture_blocker(run, info) if run.cuda_graph else "turned off (--no-cuda-graph)"
    schedule = WarmupCosine(
        peak_lr=peak,
        total_steps=per_epoch * config.epochs,
        warmup_steps=per_epoch * config.warmup_epochs,
        start_lr=config.start_lr,
        end_lr=config.min_lr,
    )
    return Run(
        name=name,
        config=config,
        info=info,
        log=log,
        shards=shards,
        loader=loader,
        model=model,
        module=wrap_for_training(model, info, run.speed),
        optimizer=build_optimizer(
            model,
            config.optimizer,
            lr=peak,
            weight_decay=config.weight_decay,
            betas=config.betas,
            device=info.device,
            capture_ready=blocker is None,
        ),
        schedule=schedule,
        steps_per_epoch=per_epoch,
        init_report=init_report,
        graph_blocker=blocker,
        writer=BackgroundWriter(),
    )
