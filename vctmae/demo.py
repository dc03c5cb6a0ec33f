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
    input normalisation (the `tiny` preset's HU / 200, see `vctmae.model.config.TINY_INPUT`): on
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
    # The paper's blr (lr = blr · batch / 256 ≈ 3e-5 at batch 8).
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
    start = time.perf_counter()
    timings: dict[str, float] = {}

    def done(stage: str, what: str) -> None:
        """Record a finished stage's seconds (since the previous one ended) and say so."""
        timings[stage] = time.perf_counter() - start - sum(timings.values())
        console.print(f"[bold green]✓[/] {stage}: {what} ({timings[stage]:.0f} s)")

    labels = write_phantoms(
        SynthConfig(
            out=out / "raw",
            cases=config.cases,
            seed=config.seed,
            fracture_rate=config.fracture_rate,
        )
    )
    done("synth", f"{config.cases} phantoms")

    data = out / "data"
    report = run_ingest(
        IngestConfig(out=data, src=out / "raw", labels=labels, workers=config.workers)
    )
    done("ingest", f"{report.get('vertebrae_written', '?')} crops")

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
    done("pretrain", f"{pretrained.state.epoch} epochs")

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
    state = finetuned.state
    done("finetune", f"best validation F1 {state.best_metric:.3f} at epoch {state.best_epoch}")

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
    done("eval", "on the held-out test split")

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
    done("explain", f"{key} → {explained['out']}")
    timings["total"] = time.perf_counter() - start

    console.print(metrics_table(metrics, title=f"test split, --multiview {config.test_multiview}"))
    summary = {
        "metrics": metrics,
        "timings_s": timings,
        "explain": explained,
        "config": dataclasses.asdict(config),
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
