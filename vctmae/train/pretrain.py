"""MAE pretraining on vertebra crops: `run_pretrain(PretrainConfig)`.

The shared set-up is `vctmae.train.run.build_run`; this module adds the MAE
objective (frame shifts, flip flags and mask noise drawn per micro-batch —
`--frames`, `--flip`; the masked-patch MSE, `--norm-pix-loss`) and its epoch hook
(weights and a reconstruction preview).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vctmae.data.frames import FrameSampler
from vctmae.model.checkpoint import model_files, write_model
from vctmae.outlock import hold_output
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
    """MAE loss of one micro-batch: a random view shift, flip flag and mask per crop.

    Draws in this order from the run's generator: the sampler's (shift, then flip flag), then
    the mask noise.
    """

    mask_ratio: float
    sampler: FrameSampler
    num_tokens: int

    def draw(self, size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        draws = self.sampler.draw(size, generator)
        draws["noise"] = torch.rand(size, self.num_tokens, generator=generator)
        return draws

    def loss(self, module: nn.Module, batch: Any, draws: dict[str, torch.Tensor]) -> torch.Tensor:
        crops, frames = self.sampler.model_input(batch.crops, batch.boxes, draws)
        loss, _, _ = module(crops, frames, mask_ratio=self.mask_ratio, noise=draws["noise"])
        return loss


def pretrain_trainer(config: PretrainConfig) -> Trainer:
    """The trainer `run_pretrain` runs (the step benchmark times its `train_step`)."""
    from vctmae.data.shards import check_boxes
    from vctmae.model import build_mae

    options = config.run
    fields = options.model_fields(norm_pix_loss=config.norm_pix_loss)
    run = build_run(config, name="pretrain", make_model=lambda: build_mae(options.model, **fields))
    model, out = run.model, run.out
    if options.frames == "mask":
        check_boxes(run.loader.indexes)
    objective = MaeObjective(
        mask_ratio=config.mask_ratio,
        sampler=FrameSampler(mode=options.frames, flip=options.flip, volume=model.config.volume),
        num_tokens=model.config.num_tokens,
    )
    preview_crop: list[torch.Tensor] = []

    def epoch_end(epoch: int, mean_loss: float, state: TrainState) -> EpochEnd:
        if run.info.is_main:
            run.writer.submit(write_model, model_files(model), out / "model.safetensors")
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
    with hold_output(config.run.out, "pretrain"):
        trainer = pretrain_trainer(config)
        trainer.start()
        state = trainer.fit()
        trainer.finish()
        run = trainer.run
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
    from vctmae.clip import middle_shift
    from vctmae.data.frames import offset_frames
    from vctmae.train.preview import save_preview

    was_training = model.training
    model.eval()
    # The middle view, as --multiview 1 (a 3-D model reads the whole crop and ignores it).
    frames = offset_frames(torch.tensor([middle_shift("crop")], device=crop.device))
    tokens = model.config.num_tokens
    noise = torch.rand(1, tokens, generator=torch.Generator().manual_seed(seed)).to(crop.device)
    _, pred, mask = model(crop, frames, mask_ratio=mask_ratio, noise=noise)
    # Targets and predictions live in the model's normalised input space; show them as [0, 1].
    target = model.denormalize_input(
        model.unpatchify(model.target(crop, frames))[0].float().mean(0)
    )
    recon = model.denormalize_input(model.unpatchify(pred.float())[0].mean(0))  # (8, 96, 96)
    config = model.config
    if config.volume:
        # A 3-D model reconstructs the whole (96, 96, 96) crop: show the sagittal slice through
        # the middle of each of its six layers of cubes, (6, 96, 96).
        shown = torch.arange(config.t_patch // 2, config.frames, config.t_patch)
        target, recon = target[shown], recon[shown]
    model.train(was_training)
    return save_preview(target, recon, mask[0], path, title=title, grid=config.grid)
