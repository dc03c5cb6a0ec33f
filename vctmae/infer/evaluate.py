"""`vctmae eval`: a classifier checkpoint on shards → predictions.csv, metrics.json, plots.

Each crop's probability combines its views under the checkpoint's clip rule
(`vctmae.infer.views`). When finetuning recorded a validation-optimal threshold
beside the checkpoint (`vctmae.infer.threshold`), metrics.json also holds the
metrics at that threshold (`at_validation_threshold`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from vctmae.clip import resolve_rule
from vctmae.infer import distributed
from vctmae.infer.config import EvalConfig, config_dict, refuse_frame_options
from vctmae.infer.device import apply_speedups, resolve_precision
from vctmae.infer.metrics import compute_metrics, metrics_table, plot_curves, write_predictions
from vctmae.infer.threshold import choose_threshold
from vctmae.infer.views import predict
from vctmae.progress import warn
from vctmae.runlog import RunLog


def run_eval(config: EvalConfig) -> dict[str, Any]:
    """Evaluate a classifier checkpoint on shards; writes predictions.csv, metrics.json, roc.png, pr.png.

    The frames, views, combination and levels are the clip rule the checkpoint was finetuned
    with unless the options say otherwise; the crops of other levels are left out, and how many
    is said.
    """
    from rich.console import Console

    from vctmae.data.frames import check_crop_shape
    from vctmae.data.shards import check_boxes, check_classes, expand_shards
    from vctmae.files import write_atomically
    from vctmae.model.checkpoint import load_classifier, read_model_description

    info = distributed.setup(config.device)
    out = Path(config.out)
    model = load_classifier(config.checkpoint).to(info.device)
    # The checkpoint's clip rule, with the options given explicitly (each that differs said).
    rule, lines = resolve_rule(
        read_model_description(config.checkpoint).clip,
        who=str(config.checkpoint),
        frames=config.frames,
        multiview=config.multiview,
        combine=config.combine,
        levels=config.loader.levels,
    )
    if info.is_main:
        for line in lines:
            warn(line)
    loader_options = dataclasses.replace(config.loader, levels=rule.levels)
    refuse_frame_options(model.config, str(config.checkpoint), frames=rule.frames)
    speed = config.speed
    module = apply_speedups(
        model, patch_embed=speed.patch_embed, compile=speed.compile, device=info.device
    )
    shards = expand_shards(list(config.shards))
    loader = loader_options.build(
        shards, batch_size=config.batch_size, training=False, device=info.device
    )
    # Checked from the shard index before anything is predicted or written: metrics need every
    # crop labelled 0 or 1; unlabelled shards on their own get predictions only.
    unlabelled_only = all(bool((index.labels == -1).all()) for index in loader.indexes)
    check_classes(
        loader.indexes,
        role="evaluated samples (--shards; evaluate unlabelled shards on their own)",
        allow_unlabelled=unlabelled_only,
    )
    check_crop_shape(loader.indexes[0], model.config)
    if rule.frames == "mask":
        check_boxes(loader.indexes)
    if loader.dropped_levels and info.is_main:
        warn(
            f"--levels {rule.levels}: {loader.dropped_levels} crop(s) of other levels left out; "
            f"{loader.num_samples} evaluated"
        )
    # The number format that runs (auto: bf16 on a GPU and on CPUs that compute it natively).
    precision = resolve_precision(speed.precision, info.device, inference=True)
    predictions = predict(
        module,
        loader,
        views=rule.multiview,
        device=info.device,
        precision=precision,
        frames=rule.frames,
        combine=rule.combine,
    )
    if len(predictions.keys) != loader.num_samples:
        raise RuntimeError(
            f"{shards[0]}…: {len(predictions.keys)} predictions for the {loader.num_samples} "
            "crops the shards hold at the selected levels"
        )
    views = {
        "multiview": rule.multiview,
        "frames": rule.frames,
        "combine": rule.combine,
        "levels": rule.levels,
        "left_out_by_levels": loader.dropped_levels,
    }
    result: dict[str, Any] = {"predictions": len(predictions.keys), "precision": precision, **views}
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_predictions(predictions, out / "predictions.csv")
        labelled = bool(predictions.keys) and bool((predictions.labels >= 0).all())
        if labelled:
            metrics = compute_metrics(predictions.labels, predictions.probs)
            # Also at the validation-optimal threshold finetuning recorded beside the weights,
            # when it holds for the probabilities of this rule.
            choice = choose_threshold(Path(config.checkpoint), rule)
            if choice.record is not None:
                metrics["at_validation_threshold"] = {
                    "threshold": choice.value,
                    "threshold_epoch": choice.record.epoch,
                    **compute_metrics(
                        predictions.labels, predictions.probs, threshold=choice.value
                    ),
                }
            else:
                metrics["validation_threshold_unused"] = choice.detail
            if metrics["roc_auc"] is not None:
                plot_curves(predictions.labels, predictions.probs, out)
        else:
            metrics = {"n": len(predictions.keys), "note": "unlabelled crops: predictions only"}
        metrics.update(checkpoint=str(config.checkpoint), precision=precision, **views)
        text = (json.dumps(metrics, indent=2) + "\n").encode()
        write_atomically(out / "metrics.json", lambda handle: handle.write(text))
        log = RunLog(out / "log.jsonl")
        log.start(
            command="eval",
            config=config_dict(config),
            world_size=info.world_size,
            device=str(info.device),
        )
        log.write("metrics", **metrics)
        if labelled and config.progress:
            Console().print(metrics_table(metrics, title=f"eval --multiview {rule.multiview}"))
            if "at_validation_threshold" in metrics:
                tuned = metrics["at_validation_threshold"]
                title = f"at the validation-optimal threshold {tuned['threshold']:.4f}"
                Console().print(metrics_table(tuned, title=title))
        result.update(metrics)
    distributed.barrier()
    return result
