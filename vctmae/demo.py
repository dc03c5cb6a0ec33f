"""The whole pipeline on synthetic phantoms, on CPU, in minutes.

synth → ingest → pretrain → finetune → eval → explain, each through its stage's
one entry point, with the `tiny` model. Pretraining sees only the training
split's crops (no labels); the classifier is chosen on the validation split;
the metrics are measured once, on the held-out test split (patients disjoint).
This module sits outside `vctmae.train` because it also drives ingest
(which imports nibabel), and training code never does.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Sizes of the demo run; the defaults fit in under 10 minutes on 2 CPU cores.

    80 phantoms → ~440 crops (~270 for training). What made the tiny model learn here is its
    input normalisation (the `tiny` preset's HU / 200, see `vctmae.model.config.vit_tiny`): on
    raw [0, 1] frames it stayed at chance for as many steps as fit in this budget. Even so it
    needs ~250–600 optimizer steps at batch 8 before the validation AUC rises (when exactly
    varies with the seed), hence 16 finetuning epochs. MAE pretraining on so few crops teaches
    the encoder little; at a large learning rate it made finetuning less reliable than a fresh
    initialisation, so the demo pretrains briefly at the paper's blr: it runs the paper's
    pipeline end to end without claiming what pretraining buys on 270 crops.
    Measurements: benchmarks/results/demo_sweep-h200.json.
    """

    out: Path = Path("demo")
    seed: int = 0
    cases: int = 80
    fracture_rate: float = 0.5
    model: str = "tiny"
    workers: int = 2  # ingest worker processes
    loader_workers: int = 0  # loading in the training process: the 2 cores go to the model
    pretrain_epochs: int = 3
    pretrain_batch: int = 8
    # The paper's blr (lr = blr · batch / 256 = 3e-5 at batch 8). A 32× larger one (1e-3) made the
    # few-epoch MAE move the encoder without teaching it much, and finetuning from it was less
    # reliable than from a fresh initialisation (demo_sweep-h200.json).
    pretrain_blr: float = 1e-3
    finetune_epochs: int = 16
    finetune_batch: int = 8
    finetune_lr: float = 5e-4
    finetune_warmup: int = 1
    grad_clip: float = 1.0
    val_multiview: int = 1  # validation every epoch on the middle view (6× cheaper)
    test_multiview: int = 6
    dropout: float = 0.0

    @classmethod
    def quick(cls, *, out: Path = Path("demo"), seed: int = 0) -> DemoConfig:
        """A smaller configuration for CI: runs every stage, learns less."""
        return cls(
            out=out,
            seed=seed,
            cases=10,
            pretrain_epochs=1,
            finetune_epochs=2,
            finetune_warmup=1,
        )


def _stage(console: Console, name: str, started: float) -> float:
    now = time.perf_counter()
    console.print(f"[bold green]✓[/] {name} ({now - started:.0f} s)")
    return now


def run_demo(config: DemoConfig, *, console: Console | None = None) -> dict[str, Any]:
    """Run every stage under `config.out`; returns the test metrics and timings."""
    from vctmae.data.options import LoaderOptions
    from vctmae.infer.config import EvalConfig, ExplainConfig
    from vctmae.infer.evaluate import run_eval
    from vctmae.infer.explain import run_explain
    from vctmae.infer.metrics import metrics_table
    from vctmae.ingest.pipeline import IngestConfig, run_ingest
    from vctmae.synth import SynthConfig
    from vctmae.synth.phantoms import write_phantoms
    from vctmae.train.config import FinetuneConfig, PretrainConfig, RunOptions
    from vctmae.train.finetune import run_finetune
    from vctmae.train.pretrain import run_pretrain

    console = console or Console()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    start = stage_start = time.perf_counter()
    timings: dict[str, float] = {}

    labels = write_phantoms(
        SynthConfig(
            out=out / "raw",
            cases=config.cases,
            seed=config.seed,
            fracture_rate=config.fracture_rate,
        )
    )
    timings["synth"] = time.perf_counter() - stage_start
    stage_start = _stage(console, f"synth: {config.cases} phantoms", stage_start)

    data = out / "data"
    report = run_ingest(
        IngestConfig(out=data, src=out / "raw", labels=labels, workers=config.workers)
    )
    timings["ingest"] = time.perf_counter() - stage_start
    stage_start = _stage(
        console, f"ingest: {report.get('vertebrae_written', '?')} crops", stage_start
    )

    def shards(split: str) -> tuple[str, ...]:
        found = tuple(sorted(str(p) for p in data.glob(f"{split}-*.tar")))
        if not found:
            from vctmae.data.shards import ShardError

            raise ShardError(data, f"ingest wrote no {split} shards (too few --cases?)")
        return found

    train, val, test = shards("train"), shards("val"), shards("test")
    # What both training stages share: the tiny model on the CPU, loading in this process.
    shared = RunOptions(
        shards=train,
        out=out / "runs",
        model=config.model,
        flip="frames",
        seed=config.seed,
        loader=LoaderOptions(workers=config.loader_workers),
        device="cpu",
        log_every=5,
    )
    pretrained = run_pretrain(
        PretrainConfig(
            run=dataclasses.replace(shared, out=out / "runs" / "pretrain"),
            epochs=config.pretrain_epochs,
            warmup_epochs=min(1, config.pretrain_epochs),
            batch_size=config.pretrain_batch,
            blr=config.pretrain_blr,
        )
    )
    timings["pretrain"] = time.perf_counter() - stage_start
    stage_start = _stage(console, f"pretrain: {pretrained.state.epoch} epochs", stage_start)

    finetuned = run_finetune(
        FinetuneConfig(
            run=dataclasses.replace(
                shared,
                out=out / "runs" / "finetune",
                init=pretrained.model_path,
                grad_clip=config.grad_clip,
            ),
            val_shards=val,
            epochs=config.finetune_epochs,
            warmup_epochs=config.finetune_warmup,
            batch_size=config.finetune_batch,
            lr=config.finetune_lr,
            min_lr=config.finetune_lr / 100,
            multiview=config.val_multiview,
            dropout=config.dropout,
        )
    )
    timings["finetune"] = time.perf_counter() - stage_start
    stage_start = _stage(
        console,
        f"finetune: best validation F1 {finetuned.state.best_metric:.3f} at epoch {finetuned.state.best_epoch}",
        stage_start,
    )

    metrics = run_eval(
        EvalConfig(
            checkpoint=finetuned.best_path,
            shards=test,
            out=out / "report",
            multiview=config.test_multiview,
            loader=shared.loader,
            device="cpu",
            progress=False,
        )
    )
    timings["eval"] = time.perf_counter() - stage_start
    stage_start = _stage(console, "eval on the held-out test split", stage_start)

    key = _explain_key(data / "manifest.csv")
    explained = run_explain(
        ExplainConfig(
            checkpoint=finetuned.best_path,
            zarr=data / "crops.zarr",
            key=key,
            out=out / "report" / "explain.png",
            multiview=config.test_multiview,
        )
    )
    timings["explain"] = time.perf_counter() - stage_start
    timings["total"] = time.perf_counter() - start
    _stage(console, f"explain: {key} → {explained['out']}", stage_start)

    console.print(metrics_table(metrics, title=f"test split, --multiview {config.test_multiview}"))
    summary = {
        "metrics": metrics,
        "timings_s": timings,
        "explain": explained,
        "config": _plain(config),
    }
    (out / "demo-summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    console.print(f"total {timings['total']:.0f} s; outputs under {out}/ (report/, runs/, data/)")
    return summary


def _explain_key(manifest: Path) -> str:
    """A fractured test vertebra if there is one, else the first test crop."""
    import csv

    with manifest.open() as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    fractured = [r for r in rows if r["class"] == "1"]
    return (fractured or rows)[0]["key"]


def _plain(config: DemoConfig) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in config.__dict__.items()}
