"""MAE pretraining on vertebra crops: `run_pretrain(PretrainConfig)` (SPEC §7)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vctmae.train import distributed
from vctmae.train.checkpoint import save_weights
from vctmae.train.config import PretrainConfig, config_dict
from vctmae.train.loop import EpochEnd, Trainer, TrainState, wrap_for_training
from vctmae.train.optim import build_adamw
from vctmae.train.runlog import RunLog
from vctmae.train.schedule import WarmupCosine, pretrain_peak_lr


@dataclass(frozen=True, kw_only=True)
class PretrainResult:
    model_path: Path
    log_path: Path
    state: TrainState
    peak_lr: float


def steps_per_epoch(batches: int, accum_steps: int, cap: int | None) -> int:
    steps = batches // accum_steps
    return min(steps, cap) if cap else steps


def run_pretrain(config: PretrainConfig) -> PretrainResult:
    """Pretrain an MAE; writes checkpoints, `model.safetensors`, previews and `log.jsonl` under `config.out`."""
    from vctmae.data import (
        ShardError,
        ShardLoader,
        check_crop_shape,
        expand_shards,
        mirror,
        offset_frames,
        random_offsets,
        shard_label,
    )
    from vctmae.model import build_mae, load_mae_st

    info = distributed.setup(config.device)
    out = Path(config.out)
    log = RunLog(out / "log.jsonl", enabled=info.is_main)
    shards = expand_shards(list(config.shards))
    loader = ShardLoader(
        shards,
        batch_size=config.batch_size,
        training=True,
        seed=config.seed,
        num_workers=config.num_workers,
        device=info.device,
        backend=config.loader,
    )
    torch.manual_seed(config.seed)
    model = build_mae(config.model, **config.model_overrides).to(info.device)
    first = loader.indexes[0]
    check_crop_shape(first.shape, where=first.path, image_size=model.config.img)
    init_report: Any = None
    if config.init is not None:
        init_report = load_mae_st(config.init, model, pos_init=config.pos_init)
    peak = pretrain_peak_lr(config.blr, config.batch_size, info.world_size, config.accum_steps)
    optimizer = build_adamw(
        model, lr=peak, weight_decay=config.weight_decay, betas=config.betas, device=info.device
    )
    per_epoch = steps_per_epoch(len(loader), config.accum_steps, config.max_steps_per_epoch)
    if per_epoch < 1:
        raise ShardError(
            shard_label(shards),
            f"{len(loader)} batches per epoch on this rank, fewer than --accum-steps "
            f"{config.accum_steps}; use fewer processes or a smaller --batch-size",
        )
    schedule = WarmupCosine(
        peak_lr=peak,
        total_steps=per_epoch * config.epochs,
        warmup_steps=per_epoch * config.warmup_epochs,
        end_lr=config.min_lr,
    )
    module = wrap_for_training(model, info, patch_embed=config.patch_embed, compile=config.compile)
    num_tokens = model.config.num_tokens
    preview_crop: list[torch.Tensor] = []

    def loss_fn(batch: Any, generator: torch.Generator) -> torch.Tensor:
        crops = batch.crops
        size = crops.shape[0]
        if not preview_crop:
            preview_crop.append(crops[:1].detach().clone())
        offsets = random_offsets(size, generator=generator).to(info.device, non_blocking=True)
        if config.mirror:
            flags = torch.rand(size, generator=generator) < 0.5
            crops = mirror(crops, flags.to(info.device, non_blocking=True))
        noise = torch.rand(size, num_tokens, generator=generator).to(info.device, non_blocking=True)
        loss, _, _ = module(
            crops, offset_frames(offsets), mask_ratio=config.mask_ratio, noise=noise
        )
        return loss

    def epoch_end(epoch: int, mean_loss: float, state: TrainState) -> EpochEnd:
        if info.is_main:
            save_weights(model, out / "model.safetensors")
            if config.preview and preview_crop:
                write_preview(
                    model,
                    preview_crop[0],
                    out / "previews" / f"epoch-{epoch + 1:04d}.png",
                    mask_ratio=config.mask_ratio,
                    seed=config.seed,
                    title=f"epoch {epoch + 1}: loss {mean_loss:.4f}",
                )
        return EpochEnd()

    trainer = Trainer(
        name="pretrain",
        config=config,
        info=info,
        model=model,
        module=module,
        optimizer=optimizer,
        schedule=schedule,
        loader=loader,
        steps_per_epoch=per_epoch,
        loss_fn=loss_fn,
        log=log,
        epoch_end=epoch_end,
    )
    resumed = config.resume and trainer.resume()
    if not resumed:
        log.start(
            command="pretrain",
            config=config_dict(config),
            world_size=info.world_size,
            device=str(info.device),
            peak_lr=peak,
            steps_per_epoch=per_epoch,
            shards=len(shards),
            init=str(init_report) if init_report is not None else None,
        )
    state = trainer.fit()
    log.write("end", epoch=state.epoch, step=state.step)
    distributed.barrier()
    return PretrainResult(
        model_path=out / "model.safetensors", log_path=out / "log.jsonl", state=state, peak_lr=peak
    )


@torch.no_grad()
def write_preview(
    model: torch.nn.Module,
    crop: torch.Tensor,
    path: Path,
    *,
    mask_ratio: float,
    seed: int,
    title: str,
) -> Path:
    """Reconstruct one crop (middle view, fixed mask) and save the preview PNG."""
    from vctmae.data import multiview_offsets, offset_frames
    from vctmae.train.preview import save_preview

    was_training = model.training
    model.eval()
    # The middle view, as --multiview 1.
    frames = offset_frames(torch.tensor(multiview_offsets(1), device=crop.device))
    tokens = model.config.num_tokens
    noise = torch.rand(1, tokens, generator=torch.Generator().manual_seed(seed)).to(crop.device)
    _, pred, mask = model(crop, frames, mask_ratio=mask_ratio, noise=noise)
    # Targets and predictions live in the model's normalised input space; show them as [0, 1].
    target = model.denormalize_input(
        model.unpatchify(model.target(crop, frames))[0].float().mean(0)
    )
    recon = model.denormalize_input(model.unpatchify(pred.float())[0].mean(0))  # (8, 96, 96)
    model.train(was_training)
    return save_preview(target, recon, mask[0], path, title=title)
