"""MAE pretraining on vertebra crops: `run_pretrain(PretrainConfig)` (SPEC §7).

The shared set-up is `vctmae.train.run.build_run`; this module adds the MAE
objective (offsets, mirror flags and mask noise drawn per micro-batch; the
masked-patch MSE) and its epoch hook (weights and a reconstruction preview).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vctmae.train import distributed
from vctmae.train.checkpoint import save_weights
from vctmae.train.config import PretrainConfig
from vctmae.train.loop import EpochEnd, Trainer, TrainState
from vctmae.train.run import build_run


@dataclass(frozen=True, kw_only=True)
class PretrainResult:
    model_path: Path
    log_path: Path
    state: TrainState
    peak_lr: float


@dataclass(frozen=True, kw_only=True)
class MaeObjective:
    """MAE loss of one micro-batch: a random view offset, mirror flag and mask per crop."""

    mask_ratio: float
    mirror: bool
    num_tokens: int

    def draw(self, size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        from vctmae.data import random_offsets

        draws = {"offsets": random_offsets(size, generator=generator)}
        if self.mirror:
            draws["mirror"] = torch.rand(size, generator=generator) < 0.5
        draws["noise"] = torch.rand(size, self.num_tokens, generator=generator)
        return draws

    def loss(self, module: nn.Module, batch: Any, draws: dict[str, torch.Tensor]) -> torch.Tensor:
        from vctmae.data import mirror, offset_frames

        crops = mirror(batch.crops, draws["mirror"]) if self.mirror else batch.crops
        frames = offset_frames(draws["offsets"])
        loss, _, _ = module(crops, frames, mask_ratio=self.mask_ratio, noise=draws["noise"])
        return loss


def pretrain_trainer(config: PretrainConfig) -> Trainer:
    """The trainer `run_pretrain` runs (the step benchmark times its `train_step`)."""
    from vctmae.model import build_mae

    options = config.run
    run = build_run(
        config,
        name="pretrain",
        make_model=lambda: build_mae(options.model, **options.model_overrides),
    )
    model, out = run.model, run.out
    objective = MaeObjective(
        mask_ratio=config.mask_ratio, mirror=options.mirror, num_tokens=model.config.num_tokens
    )
    preview_crop: list[torch.Tensor] = []

    def epoch_end(epoch: int, mean_loss: float, state: TrainState) -> EpochEnd:
        if run.info.is_main:
            save_weights(model, out / "model.safetensors")
            if config.preview:
                if not preview_crop:
                    # The first crop of the training split's first shard, the same every epoch.
                    preview_crop.append(first_crop(run.loader).to(run.info.device))
                picture = write_preview(
                    model,
                    preview_crop[0],
                    out / "previews" / f"epoch-{epoch + 1:04d}.png",
                    mask_ratio=config.mask_ratio,
                    seed=options.seed,
                    title=f"epoch {epoch + 1}: loss {mean_loss:.4f}",
                )
                run.log.image("preview", picture, step=state.step)
        return EpochEnd()

    return Trainer(run, objective, epoch_end)


def run_pretrain(config: PretrainConfig) -> PretrainResult:
    """Pretrain an MAE; writes checkpoints, `model.safetensors`, previews and `log.jsonl` under `config.run.out`."""
    trainer = pretrain_trainer(config)
    trainer.start()
    state = trainer.fit()
    run = trainer.run
    run.log.write("end", epoch=state.epoch, step=state.step)
    run.log.close()
    distributed.barrier()
    return PretrainResult(
        model_path=run.out / "model.safetensors",
        log_path=run.out / "log.jsonl",
        state=state,
        peak_lr=run.schedule.peak_lr,
    )


def first_crop(loader: Any) -> torch.Tensor:
    """The first crop of the loader's first shard, int16 (1, 96, 96, 96) on the CPU."""
    import numpy as np

    from vctmae.data.shards import read_crop

    index = loader.indexes[0]
    crop = np.empty(index.shape, dtype=np.int16)
    with open(index.path, "rb") as handle:
        read_crop(handle.fileno(), int(index.offsets[0]), crop)
    return torch.from_numpy(crop)[None]


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
