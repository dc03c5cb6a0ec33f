"""Fracture-classification finetuning: `run_finetune(FinetuneConfig)`.

The shared set-up is `vctmae.train.run.build_run`; this module adds the
classifier objective (class-weighted cross-entropy at a random view shift,
`--frames`, `--flip`), the label checks and the epoch hook (validation — `--multiview`,
`--combine` —, best weights, early stopping).

Every epoch ends with a multi-view validation pass; the classifier with the
best validation F1 so far is written to `best.safetensors` (ties keep the
earlier epoch), with the validation-optimal F1 threshold beside it
(`best.threshold.json`, `vctmae.infer.threshold`), and the run stops early after
`patience` epochs without a better F1.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vctmae.clip import ClipRule
from vctmae.data.frames import FrameSampler
from vctmae.infer.metrics import compute_metrics
from vctmae.infer.threshold import validation_threshold, write_best
from vctmae.infer.views import predict
from vctmae.model.checkpoint import model_files
from vctmae.outlock import hold_output
from vctmae.train.config import FinetuneConfig
from vctmae.train.loop import EpochEnd, Trainer, TrainState
from vctmae.train.run import build_run

BEST = "best.safetensors"


@dataclass(frozen=True, kw_only=True)
class FinetuneResult:
    best_path: Path
    log_path: Path
    state: TrainState
    class_weights: list[float]


def class_weights(indexes: list[Any], num_classes: int = 2) -> list[float]:
    """Inverse-frequency weights N / (C · n_c) of the training labels in the shard index."""
    from vctmae.data.shards import ClassError, shard_label

    labels = np.concatenate([index.labels for index in indexes])
    counts = Counter(int(v) for v in labels)
    if any(counts.get(c, 0) == 0 for c in range(num_classes)):
        raise ClassError(
            f"{shard_label([index.path for index in indexes])}: training labels {dict(counts)} "
            "lack a class; inverse class weights need samples of both classes"
        )
    total = sum(counts[c] for c in range(num_classes))
    return [total / (num_classes * counts[c]) for c in range(num_classes)]


@dataclass(frozen=True, kw_only=True)
class ClassifierObjective:
    """Class-weighted cross-entropy of one micro-batch at a random view shift (and flip flag),
    drawn by `FrameSampler.draw`."""

    sampler: FrameSampler
    class_weights: torch.Tensor  # (2,) on the training device

    def draw(self, size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return self.sampler.draw(size, generator)

    def loss(self, module: nn.Module, batch: Any, draws: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = module(*self.sampler.model_input(batch.crops, batch.boxes, draws))
        return nn.functional.cross_entropy(logits.float(), batch.labels, weight=self.class_weights)


def finetune_trainer(config: FinetuneConfig) -> Trainer:
    """The trainer `run_finetune` runs (the step benchmark times its `train_step`)."""
    from vctmae.data.frames import check_crop_shape
    from vctmae.data.shards import check_boxes, check_classes, expand_shards
    from vctmae.model import build_classifier

    options = config.run
    dropout = {} if config.dropout is None else {"head_dropout": config.dropout}
    fields = options.model_fields(**dropout)
    run = build_run(
        config,
        name="finetune",
        make_model=lambda: build_classifier(options.model, num_classes=2, **fields),
    )
    model, info = run.model, run.info
    val_shards = expand_shards(list(config.val_shards)) if config.val_shards else []
    val_loader = (
        options.loader.build(
            val_shards, batch_size=config.batch_size, training=False, device=info.device
        )
        if val_shards
        else None
    )
    # Every label is known from the shard index: refuse unusable ones before the first step.
    check_classes(run.loader.indexes, role="training samples (--shards)")
    if options.frames == "mask":
        check_boxes(run.loader.indexes)
    if val_loader is not None:
        check_classes(val_loader.indexes, role="validation samples (--val-shards)")
        check_crop_shape(val_loader.indexes[0], model.config)
        if options.frames == "mask":
            check_boxes(val_loader.indexes)
    if config.class_weights == "inverse":
        weights, weight_source = class_weights(run.loader.indexes), "shard labels"
    else:
        weights, weight_source = [1.0, 1.0], "none"
    objective = ClassifierObjective(
        sampler=FrameSampler(mode=options.frames, flip=options.flip, volume=model.config.volume),
        class_weights=torch.tensor(weights, dtype=torch.float32, device=info.device),
    )
    best_path = run.out / BEST
    # The rule the classifier is validated with travels in its weights' description, so that
    # eval, explain and predict apply the same one.
    rule = ClipRule(
        frames=options.frames,
        multiview=config.multiview,
        combine=config.combine,
        levels=options.loader.levels,
    )

    def epoch_end(epoch: int, mean_loss: float, state: TrainState) -> EpochEnd:
        if val_loader is None:
            # Without validation data the latest weights are the ones to use.
            if info.is_main:
                run.writer.submit(write_best, model_files(model, clip=rule), best_path, None)
            state.best_epoch = epoch + 1
            return EpochEnd()
        predictions = predict(
            model,
            val_loader,
            views=rule.multiview,
            device=info.device,
            precision=options.speed.precision,
            frames=rule.frames,
            combine=rule.combine,
        )
        metrics = compute_metrics(predictions.labels, predictions.probs)
        f1 = metrics["f1"]
        improved = state.best_metric is None or f1 > state.best_metric
        if improved:
            state.best_metric, state.best_epoch, state.bad_epochs = f1, epoch + 1, 0
            if info.is_main:
                # The F1-optimal threshold of these validation predictions goes beside the weights.
                threshold = validation_threshold(
                    predictions.labels, predictions.probs, epoch=epoch + 1, rule=rule
                )
                run.writer.submit(write_best, model_files(model, clip=rule), best_path, threshold)
        else:
            state.bad_epochs += 1
        scalars = {f"val_{k}": v for k, v in metrics.items() if isinstance(v, float)}
        return EpochEnd(metrics=scalars, stop=state.bad_epochs >= config.patience)

    return Trainer(
        run,
        objective,
        epoch_end,
        clip_rule=rule,
        log_fields={
            "class_weights": weights,
            "class_weight_source": weight_source,
            "val_shards": len(val_shards),
        },
        other_shards=val_loader.indexes if val_loader is not None else (),
    )


def run_finetune(config: FinetuneConfig) -> FinetuneResult:
    """Finetune a classifier; writes checkpoints, `best.safetensors` and `log.jsonl` under `config.run.out`."""
    with hold_output(config.run.out, "finetune"):
        trainer = finetune_trainer(config)
        trainer.start()
        state = trainer.fit()
        trainer.finish(best_epoch=state.best_epoch, best_val_f1=state.best_metric)
        run = trainer.run
        return FinetuneResult(
            best_path=run.out / BEST,
            log_path=run.out / "log.jsonl",
            state=state,
            class_weights=trainer.log_fields["class_weights"],
        )
