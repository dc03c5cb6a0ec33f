"""GPU smoke check of the trainers themselves (not just the step): a lent card, minutes.

Writes an easy synthetic labelled set as WebDataset shards, then runs the real
entry points on CUDA — `run_pretrain` (bf16 autocast, fused AdamW, Triton patch
embedding, loader → device), `run_finetune` (fused Adam, multi-view validation),
`run_eval` — with the given preset, and reports the trainer's measured
samples/s (from its JSONL log: loader included, first epoch excluded) next to
the finetuned model's test metrics. Results: $OUT/train_gpu_check.json.

    python benchmarks/train_gpu_check.py --preset large --samples 512
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import time
from pathlib import Path

import numpy as np
import torch


def easy_crop(rng: np.random.Generator, label: int) -> np.ndarray:
    crop = rng.normal(-700, 60, size=(96, 96, 96)).astype(np.int16)
    z, y, x = (int(v) for v in rng.integers(20, 50, size=3))
    crop[z : z + 30, y : y + 30, x : x + 30] = 700 if label else -250
    return crop


def write_split(directory: Path, split: str, count: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{split}-000000.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(count):
            label, key = i % 2, f"{split}{i:05d}_L1"
            buffer = io.BytesIO()
            np.save(buffer, easy_crop(rng, label))
            for ext, data in (
                ("crop.npy", buffer.getvalue()),
                ("json", b"{}"),
                ("cls", str(label).encode()),
            ):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def epoch_rates(log: Path) -> list[float]:
    records = [json.loads(line) for line in log.read_text().splitlines()]
    return [r["samples_per_s"] for r in records if r["event"] == "epoch"]


def main() -> None:
    from vctmae.train import (
        EvalConfig,
        FinetuneConfig,
        PretrainConfig,
        run_eval,
        run_finetune,
        run_pretrain,
    )

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="large")
    parser.add_argument("--samples", type=int, default=512, help="training crops")
    parser.add_argument("--pretrain-batch", type=int, default=8)
    parser.add_argument("--finetune-batch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--device", default="cuda", help="cuda, or cpu for a dry run of this script"
    )
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    out = Path(os.environ.get("OUT", "benchmarks/results"))
    work = Path(os.environ.get("WORK", "/tmp/train_gpu_check"))
    start = time.perf_counter()
    shards = {
        "train": write_split(work / "data", "train", args.samples, 1),
        "val": write_split(work / "data", "val", 64, 2),
        "test": write_split(work / "data", "test", 128, 3),
    }
    print(f"data written in {time.perf_counter() - start:.0f} s", flush=True)
    common = dict(
        model=args.preset,
        device=args.device,
        num_workers=args.workers,
        progress=False,
        log_every=10,
    )
    pre = run_pretrain(
        PretrainConfig(
            shards=(shards["train"],),
            out=work / "pre",
            epochs=args.epochs,
            warmup_epochs=1,
            batch_size=args.pretrain_batch,
            **common,
        )  # fmt: skip
    )
    print(f"pretrain done {time.perf_counter() - start:.0f} s", flush=True)
    ft = run_finetune(
        FinetuneConfig(
            shards=(shards["train"],),
            val_shards=(shards["val"],),
            out=work / "ft",
            init=pre.model_path,
            epochs=args.epochs,
            warmup_epochs=1,
            batch_size=args.finetune_batch,
            lr=1e-4,
            **common,
        )  # fmt: skip
    )
    print(f"finetune done {time.perf_counter() - start:.0f} s", flush=True)
    metrics = run_eval(
        EvalConfig(
            checkpoint=ft.best_path,
            shards=(shards["test"],),
            out=work / "eval",
            multiview=6,
            device=args.device,
            num_workers=args.workers,
            progress=False,
        )  # fmt: skip
    )
    report = {
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "preset": args.preset,
        "pretrain_batch": args.pretrain_batch,
        "finetune_batch": args.finetune_batch,
        "pretrain_epoch_samples_per_s": epoch_rates(pre.log_path),
        "finetune_epoch_samples_per_s": epoch_rates(ft.log_path),
        "pretrain_losses": [h["loss"] for h in pre.state.history],
        "finetune_history": ft.state.history,
        "test_metrics": {
            k: v for k, v in metrics.items() if k in ("n", "f1", "accuracy", "roc_auc")
        },
        "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30
        if args.device == "cuda"
        else None,
        "wall_s": time.perf_counter() - start,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
