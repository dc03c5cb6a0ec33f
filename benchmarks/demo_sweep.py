"""Which demo settings let the tiny model learn the phantoms' fractures? A sweep of plain loops.

Each configuration finetunes a `tiny` classifier (optionally after a few MAE epochs) on the
training crops of an ingested phantom set held in memory, validates every epoch on the middle
view, keeps the epoch with the best validation F1 and reports test AUC/F1 over six views. It
mirrors what `vctmae demo` does with the trainers, without their loaders and checkpoints, so
dozens of settings fit into a minute of GPU time. Results: benchmarks/results/demo_sweep-h200.json.

    vctmae synth --out /tmp/p --cases 80 --fracture-rate 0.5
    vctmae ingest --src /tmp/p --labels /tmp/p/labels.csv --out /tmp/p/data
    python benchmarks/demo_sweep.py --zarr /tmp/p/data/crops.zarr --configs configs.json \\
        [--part 0 --parts 4] > results.jsonl

A configuration is a JSON object: name, lr, and optionally seed, epochs (12), batch (8),
warmup_epochs (1), norm [mean, std] (the model's input normalisation), mae_epochs (0), mae_lr
(1e-3), mirror (false).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score, roc_auc_score

from vctmae.data.frames import mirror, offset_frames, random_offsets
from vctmae.infer.device import install_patch_embed
from vctmae.model import build_classifier, build_mae


def load_splits(zarr_path: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """int16 crops and class labels of each split, from an ingested crops.zarr."""
    import zarr

    group = zarr.open_group(zarr_path, mode="r")
    splits = list(group.attrs["splits"])
    classes = np.asarray(group["classes"][:], dtype=np.int64)
    crops = group["crops"][:]
    out = {}
    for split in ("train", "val", "test"):
        index = [i for i, s in enumerate(splits) if s == split]
        out[split] = (torch.from_numpy(crops[index]), torch.from_numpy(classes[index]))
    return out


def model_overrides(config: dict[str, Any]) -> dict[str, Any]:
    if "norm" not in config:
        return {}
    mean, std = config["norm"]
    return {"input_mean": mean, "input_std": std}


def pretrain_encoder(config: dict[str, Any], crops: torch.Tensor, device: str) -> dict:
    """A few MAE epochs (AdamW β 0.9/0.95, mask 0.8, batch 8); returns the encoder weights."""
    mae = build_mae("tiny", **model_overrides(config)).to(device)
    install_patch_embed(mae, "auto", torch.device(device))
    optimizer = torch.optim.AdamW(
        mae.parameters(), lr=config.get("mae_lr", 1e-3), betas=(0.9, 0.95), weight_decay=0.05
    )
    for _ in range(config["mae_epochs"]):
        order = torch.randperm(len(crops), device=device)
        for start in range(0, len(crops) - 7, 8):
            batch = crops[order[start : start + 8]]
            frames = offset_frames(random_offsets(8).to(device))
            loss, _, _ = mae(batch, frames, mask_ratio=0.8)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return {
        k: v for k, v in mae.state_dict().items() if not k.startswith(("decoder", "mask_token"))
    }


def probabilities(model, crops: torch.Tensor, views: list[int], device: str) -> np.ndarray:
    """Mean fracture probability over the given frame offsets."""
    model.eval()
    per_view = []
    with torch.no_grad():
        for offset in views:
            chunks = []
            for start in range(0, len(crops), 64):
                batch = crops[start : start + 64].to(device)
                frames = offset_frames(torch.full((len(batch),), offset, device=device))
                chunks.append(model(batch, frames).softmax(1)[:, 1])
            per_view.append(torch.cat(chunks))
    model.train()
    return torch.stack(per_view).mean(0).cpu().numpy()


def run(config: dict[str, Any], data: dict, device: str) -> dict[str, Any]:
    torch.manual_seed(config.get("seed", 0))
    crops, labels = (t.to(device) for t in data["train"])
    (val_crops, val_labels), (test_crops, test_labels) = data["val"], data["test"]
    model = build_classifier("tiny", head_dropout=0.0, **model_overrides(config)).to(device)
    install_patch_embed(model, "torch", torch.device(device))
    if config.get("mae_epochs"):
        model.load_state_dict(pretrain_encoder(config, crops, device), strict=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])
    batch, epochs = config.get("batch", 8), config.get("epochs", 12)
    per_epoch = len(crops) // batch
    total, warmup = epochs * per_epoch, config.get("warmup_epochs", 1) * per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
        ),
    )
    counts = torch.bincount(labels, minlength=2).float()
    weight = (1 / counts) / (1 / counts).sum() * 2  # inverse class frequency, mean 1
    started, history, best = time.perf_counter(), [], (-1.0, None)
    for epoch in range(epochs):
        order = torch.randperm(len(crops), device=device)
        loss_sum = torch.zeros((), device=device)
        for start in range(0, per_epoch * batch, batch):
            index = order[start : start + batch]
            batch_crops = crops[index]
            if config.get("mirror"):
                batch_crops = mirror(batch_crops, torch.rand(batch, device=device) < 0.5)
            logits = model(batch_crops, offset_frames(random_offsets(batch).to(device)))
            loss = F.cross_entropy(logits, labels[index], weight=weight)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            loss_sum += loss.detach() * batch
        val = probabilities(model, val_crops, [3], device)
        val_f1 = f1_score(val_labels, val > 0.5)
        history.append(
            [
                epoch,
                round(loss_sum.item() / (per_epoch * batch), 3),
                round(roc_auc_score(val_labels, val), 3),
                round(val_f1, 3),
            ]
        )
        if val_f1 >= best[0]:
            best = (val_f1, {k: v.clone() for k, v in model.state_dict().items()})
    last = probabilities(model, test_crops, list(range(6)), device)
    model.load_state_dict(best[1])
    chosen = probabilities(model, test_crops, list(range(6)), device)
    return {
        "name": config["name"],
        "history": history,  # [epoch, train loss, val AUC, val F1]
        "test_auc": round(roc_auc_score(test_labels, chosen), 3),
        "test_f1": round(f1_score(test_labels, chosen > 0.5), 3),
        "last_auc": round(roc_auc_score(test_labels, last), 3),
        "last_f1": round(f1_score(test_labels, last > 0.5), 3),
        "steps": total,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zarr", required=True, help="an ingested crops.zarr with train/val/test")
    parser.add_argument("--configs", required=True, help="JSON list of configurations")
    parser.add_argument("--part", type=int, default=0, help="run every --parts-th config from here")
    parser.add_argument("--parts", type=int, default=1)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = load_splits(args.zarr)
    with open(args.configs) as f:
        configs = json.load(f)
    for config in configs[args.part :: args.parts]:
        print(json.dumps(run(config, data, device)), flush=True)


if __name__ == "__main__":
    main()
