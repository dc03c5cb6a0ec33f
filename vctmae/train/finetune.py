"""Fracture-classification finetuning: `run_finetune(FinetuneConfig)` (SPEC §7).

Every epoch ends with a multi-view validation pass; the classifier with the
best validation F1 so far is written to `best.safetensors` (ties keep the
earlier epoch), and the run stops early after `patience` epochs without a
better F1.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vctmae.model.checkpoint import CheckpointError
from vctmae.train import distributed
from vctmae.train.checkpoint import save_weights
from vctmae.train.config import FinetuneConfig, config_dict
from vctmae.train.loop import EpochEnd, Trainer, TrainState, wrap_for_training
from vctmae.train.optim import build_adam
from vctmae.train.runlog import RunLog
from vctmae.train.schedule import WarmupCosine

# Keys a classifier has that an MAE checkpoint cannot provide.
HEAD_PREFIXES = ("head.",)


@dataclass(frozen=True, kw_only=True)
class FinetuneResult:
    best_path: Path
    log_path: Path
    state: TrainState
    class_weights: list[float]


def init_from_pretraining(model: nn.Module, path: Path) -> dict[str, list[str]]:
    """Copy the encoder of a pretraining safetensors file into a classifier.

    Decoder weights are ignored; every classifier weight except the head must
    come from the file with the same shape, or the load is refused. So is a file whose config
    (beside it) normalises the input differently: the weights would see other numbers.
    """
    from vctmae.model.checkpoint import config_path, read_model_config, read_safetensors

    if config_path(path).is_file():
        _, pretrained = read_model_config(path)
        ours = model.config
        if (pretrained.input_mean, pretrained.input_std) != (ours.input_mean, ours.input_std):
            raise CheckpointError(
                f"{path}: pretrained on inputs normalised with mean {pretrained.input_mean}, "
                f"std {pretrained.input_std}, but this classifier uses mean {ours.input_mean}, "
                f"std {ours.input_std}; finetune with the same model settings as pretraining"
            )
    source = read_safetensors(path)
    target = model.state_dict()
    missing = [k for k in target if k not in source and not k.startswith(HEAD_PREFIXES)]
    mismatched = [k for k in target if k in source and source[k].shape != target[k].shape]
    if missing or mismatched:
        raise CheckpointError(
            f"{path}: not an encoder of this model — missing {missing[:5]}, "
            f"shape mismatch {mismatched[:5]} (same --model preset as pretraining?)"
        )
    loaded = {k: v for k, v in source.items() if k in target}
    model.load_state_dict(loaded, strict=False)
    return {
        "loaded": sorted(loaded),
        "ignored": sorted(k for k in source if k not in target),
        "initialised_fresh": sorted(k for k in target if k not in source),
    }


def init_classifier(model: nn.Module, init: Path | None, pos_init: str) -> Any:
    """Initialise from a pretraining .safetensors, a mae_st/PySlowFast .pth, or nothing."""
    if init is None:
        return None
    init = Path(init)
    if not init.is_file():
        raise CheckpointError(f"{init}: --init checkpoint not found")
    if init.suffix == ".safetensors":
        return init_from_pretraining(model, init)
    from vctmae.model import load_mae_st

    return load_mae_st(init, model, pos_init=pos_init)


def class_weights(indexes: list[Any], num_classes: int = 2) -> list[float]:
    """Inverse-frequency weights N / (C · n_c) of the training labels in the shard index."""
    from vctmae.data import ClassError, shard_label

    labels = np.concatenate([index.labels for index in indexes])
    counts = Counter(int(v) for v in labels)
    if any(counts.get(c, 0) == 0 for c in range(num_classes)):
        raise ClassError(
            f"{shard_label([index.path for index in indexes])}: training labels {dict(counts)} "
            "lack a class; inverse class weights need samples of both classes"
        )
    total = sum(counts[c] for c in range(num_classes))
    return [total / (num_classes * counts[c]) for c in range(num_classes)]


def run_finetune(config: FinetuneConfig) -> FinetuneResult:
    """Finetune a classifier; writes checkpoints, `best.safetensors` and `log.jsonl` under `config.out`."""
    from vctmae.data import (
        ShardError,
        ShardLoader,
        check_classes,
        check_crop_shape,
        expand_shards,
        mirror,
        offset_frames,
        random_offsets,
        shard_label,
    )
    from vctmae.model import build_classifier
    from vctmae.train.evaluate import compute_metrics, predict

    info = distributed.setup(config.device)
    out = Path(config.out)
    log = RunLog(out / "log.jsonl", enabled=info.is_main)
    shards = expand_shards(list(config.shards))
    val_shards = expand_shards(list(config.val_shards)) if config.val_shards else []
    loader = ShardLoader(
        shards,
        batch_size=config.batch_size,
        training=True,
        seed=config.seed,
        num_workers=config.num_workers,
        device=info.device,
        backend=config.loader,
    )
    val_loader = (
        ShardLoader(
            val_shards,
            batch_size=config.batch_size,
            training=False,
            num_workers=config.num_workers,
            device=info.device,
            backend=config.loader,
        )
        if val_shards
        else None
    )
    # Every label is known from the shard index: refuse unusable ones before the first step.
    check_classes(loader.indexes, role="training samples (--shards)")
    if val_loader is not None:
        check_classes(val_loader.indexes, role="validation samples (--val-shards)")
    torch.manual_seed(config.seed)
    overrides = dict(config.model_overrides)
    if config.dropout is not None:
        overrides["head_dropout"] = config.dropout
    model = build_classifier(config.model, num_classes=2, **overrides).to(info.device)
    for checked in (loader, val_loader) if val_loader is not None else (loader,):
        first = checked.indexes[0]
        check_crop_shape(first.shape, where=first.path, image_size=model.config.img)
    init_report = init_classifier(model, config.init, config.pos_init)
    if config.class_weights == "inverse":
        weights, weight_source = class_weights(loader.indexes), "shard labels"
    else:
        weights, weight_source = [1.0, 1.0], "none"
    weight_tensor = torch.tensor(weights, dtype=torch.float32, device=info.device)
    optimizer = build_adam(
        model, lr=config.lr, weight_decay=config.weight_decay, device=info.device
    )
    per_epoch = len(loader) // config.accum_steps
    if config.max_steps_per_epoch:
        per_epoch = min(per_epoch, config.max_steps_per_epoch)
    if per_epoch < 1:
        raise ShardError(
            shard_label(shards),
            f"{len(loader)} batches per epoch on this rank, fewer than --accum-steps "
            f"{config.accum_steps}; use fewer processes or a smaller --batch-size",
        )
    schedule = WarmupCosine(
        peak_lr=config.lr,
        total_steps=per_epoch * config.epochs,
        warmup_steps=per_epoch * config.warmup_epochs,
        start_lr=config.warmup_start_lr,
        end_lr=config.min_lr,
    )
    module = wrap_for_training(model, info, patch_embed=config.patch_embed, compile=config.compile)

    def loss_fn(batch: Any, generator: torch.Generator) -> torch.Tensor:
        crops = batch.crops
        size = crops.shape[0]
        offsets = random_offsets(size, generator=generator).to(info.device, non_blocking=True)
        if config.mirror:
            flags = torch.rand(size, generator=generator) < 0.5
            crops = mirror(crops, flags.to(info.device, non_blocking=True))
        logits = module(crops, offset_frames(offsets))
        return nn.functional.cross_entropy(logits.float(), batch.labels, weight=weight_tensor)

    best_path = out / "best.safetensors"

    def epoch_end(epoch: int, mean_loss: float, state: TrainState) -> EpochEnd:
        if val_loader is None:
            # Without validation data the latest weights are the ones to use.
            if info.is_main:
                save_weights(model, best_path)
            state.best_epoch = epoch + 1
            return EpochEnd()
        predictions = predict(model, val_loader, views=config.multiview, device=info.device)
        metrics = compute_metrics(predictions.labels, predictions.probs)
        f1 = metrics["f1"]
        improved = state.best_metric is None or f1 > state.best_metric
        if improved:
            state.best_metric, state.best_epoch, state.bad_epochs = f1, epoch + 1, 0
            if info.is_main:
                save_weights(model, best_path)
        else:
            state.bad_epochs += 1
        scalars = {f"val_{k}": v for k, v in metrics.items() if isinstance(v, float)}
        return EpochEnd(metrics=scalars, stop=state.bad_epochs >= config.patience)

    trainer = Trainer(
        name="finetune",
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
            command="finetune",
            config=config_dict(config),
            world_size=info.world_size,
            device=str(info.device),
            steps_per_epoch=per_epoch,
            class_weights=weights,
            class_weight_source=weight_source,
            shards=len(shards),
            val_shards=len(val_shards),
            init=str(init_report) if init_report is not None else None,
        )
    state = trainer.fit()
    log.write(
        "end",
        epoch=state.epoch,
        step=state.step,
        best_epoch=state.best_epoch,
        best_val_f1=state.best_metric,
    )
    distributed.barrier()
    return FinetuneResult(
        best_path=best_path, log_path=out / "log.jsonl", state=state, class_weights=weights
    )
