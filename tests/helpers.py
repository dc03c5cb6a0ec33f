"""Helpers the tests share: readers of what the product writes, writers of small inputs, the
shrunken test model and its training runs, and the command line as a test calls it.

Nothing in the package calls these. Tests import them with `from helpers import …` (pytest puts
this folder on `sys.path`); a test module never imports another test module.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import sys
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vctmae.cli import app
from vctmae.data.loader import ShardLoader
from vctmae.data.options import LoaderOptions
from vctmae.data.shards import expand_shards, index_shards
from vctmae.infer.metrics import Predictions
from vctmae.ingest.nifti import Volume, oriented_view, read_nifti_ct, read_nifti_labels
from vctmae.ingest.writers import Sample, write_shards
from vctmae.train.config import FinetuneConfig, PretrainConfig, RunOptions


def load_ct(path: str | Path) -> Volume:
    """A NIfTI CT as float32 HU (its scaling applied), whole; rejects NaN/inf voxels."""
    stored = read_nifti_ct(path)
    data = stored.data.astype(np.float32)
    if stored.slope != 1.0:
        data *= np.float32(stored.slope)
    if stored.intercept != 0.0:
        data += np.float32(stored.intercept)
    return Volume(path=stored.path, data=data, affine=stored.affine)


def reorient(volume: Volume, codes: str) -> Volume:
    """The same volume with its voxels stored along axis codes `codes` (a C-order copy)."""
    view = oriented_view(volume, codes)
    if view is volume:
        return volume
    return replace(view, data=np.ascontiguousarray(view.data))


def load_labels(path: str | Path) -> Volume:
    """A NIfTI label map as a C-order non-negative integer array (uint8/uint16/int32)."""
    stored = read_nifti_labels(path)
    data = stored.data
    if data.dtype.kind == "i" and data.size and data.min() < 0:
        # Negative values are no vertebra in any scheme; treat them as background.
        data = np.clip(data, 0, None)
    top = int(data.max()) if data.size else 0
    dtype = np.uint8 if top < 2**8 else np.uint16 if top < 2**16 else np.int32
    return replace(stored, data=np.ascontiguousarray(data, dtype=dtype))


def read_log(path: Path) -> list[dict[str, Any]]:
    """All records of a training run's JSONL log."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def read_predictions(path: Path) -> Predictions:
    """The keys, labels and probabilities of a predictions.csv (`eval`, `predict`)."""
    with Path(path).open() as f:
        rows = list(csv.DictReader(f))
    return Predictions(
        keys=[r["key"] for r in rows],
        labels=np.array([int(r["label"]) for r in rows], dtype=np.int64),
        probs=np.array([float(r["prob_fracture"]) for r in rows]),
    )


def write_shard(path: Path, samples: Iterable[Sample]) -> Path:
    """One shard at `path`, which must be named like ingest's first shard (`{split}-000000.tar`)."""
    path = Path(path)
    split = path.name.removesuffix("-000000.tar")
    if split == path.name or not split:
        raise ValueError(f"{path.name}: a first shard is named {{split}}-000000.tar")
    [written] = write_shards(path.parent, split, [samples])
    return written


SMALL_MODEL = {
    "embed_dim": 48,
    "depth": 2,
    "num_heads": 2,
    "decoder_embed_dim": 32,
    "decoder_depth": 1,
    "decoder_num_heads": 2,
}


def easy_crop(rng: np.random.Generator, label: int) -> np.ndarray:
    """A (96, 96, 96) int16 crop: air-ish background, one box whose density tells the class."""
    crop = rng.normal(-700, 60, size=(96, 96, 96)).astype(np.int16)
    z, y, x = (int(v) for v in rng.integers(20, 50, size=3))
    crop[z : z + 30, y : y + 30, x : x + 30] = 700 if label else -250
    return crop


def write_split(directory: Path, split: str, count: int, seed: int, shards: int = 1) -> list[Path]:
    """Labelled shards `{split}-00000N.tar` (+ rows appended to manifest.csv), alternating classes."""
    rng = np.random.default_rng(seed)
    per_shard = math.ceil(count / shards)
    groups = [
        [(f"{split}{i:03d}_L1", easy_crop(rng, i % 2), i % 2)
         for i in range(s * per_shard, min(count, (s + 1) * per_shard))]
        for s in range(shards)
    ]  # fmt: skip
    paths = write_shards(directory, split, groups)
    manifest = directory / "manifest.csv"
    new = not manifest.exists()
    with manifest.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["key", "class", "split", "shard"])
        for path, group in zip(paths, groups, strict=True):
            writer.writerows([key, label, split, path.name] for key, _, label in group)
    return paths


def train_val_thin_shards(root: Path, rng: np.random.Generator) -> dict[str, list[str]]:
    """Labelled shards of easy crops under root/lab (train: 16 crops, val: 8), and "thin": 8
    labelled crops only 64 slices deep instead of 96, which training must refuse."""
    thin = root / "thin-000000.tar"
    crop = rng.integers(-1000, 1000, size=(64, 96, 96), dtype=np.int16)
    write_shard(thin, [(f"t{i:02d}_L3", crop, i % 2) for i in range(8)])
    return {
        "train": [str(p) for p in write_split(root / "lab", "train", 16, seed=1)],
        "val": [str(p) for p in write_split(root / "lab", "val", 8, seed=2)],
        "thin": [str(thin)],
    }


RUN_FIELDS = {field.name for field in dataclasses.fields(RunOptions)}


# Test runs: the shrunken tiny model on the CPU, reading in the main process.
TEST_RUN = dict(
    model="tiny",
    model_overrides=SMALL_MODEL,
    loader=LoaderOptions(workers=0),
    device="cpu",
    log_every=2,
    progress=False,
)


def pretrain_config(shards, out: Path, **changes) -> PretrainConfig:
    """A small pretraining run; `changes` may name RunOptions or PretrainConfig fields."""
    run = {**TEST_RUN, "flip": "frames", **{k: v for k, v in changes.items() if k in RUN_FIELDS}}
    stage = dict(epochs=3, warmup_epochs=1, batch_size=8, blr=0.05)
    stage.update({k: v for k, v in changes.items() if k not in RUN_FIELDS})
    return PretrainConfig(run=RunOptions(shards=tuple(shards), out=out, **run), **stage)


def finetune_config(run: RunOptions, val_shards, **changes) -> FinetuneConfig:
    """A small finetuning run validated on `val_shards`: batch 8, lr 1e-3 falling to 1e-5 after
    one warmup epoch, one view, no head dropout; `changes` replace any FinetuneConfig field."""
    stage = dict(
        epochs=5, warmup_epochs=1, batch_size=8, lr=1e-3, min_lr=1e-5, multiview=1, dropout=0.0
    )
    return FinetuneConfig(run=run, val_shards=tuple(val_shards), **{**stage, **changes})


def stop_before_epoch(patch: pytest.MonkeyPatch, stop: int) -> None:
    """Ctrl-C when epoch `stop` (0-based) is about to start."""
    original = ShardLoader.set_epoch

    def interrupting(self, epoch):
        if epoch == stop:
            raise KeyboardInterrupt
        original(self, epoch)

    patch.setattr(ShardLoader, "set_epoch", interrupting)


def shrink(patch: pytest.MonkeyPatch) -> None:
    """`--model tiny` builds the shrunken test model (48 wide, 2 blocks), and pretraining skips
    its preview pictures and their TensorBoard copies (tests/test_train.py checks them): runs of
    seconds on 2 cores."""
    from vctmae.model import config as model_config

    small = model_config.preset_config("tiny", **SMALL_MODEL)
    patch.setitem(model_config.PRESETS, "tiny", small)
    patch.setattr("vctmae.train.pretrain.write_preview", lambda *args, **kwargs: None)
    patch.setattr("vctmae.runlog.RunLog.image", lambda *args, **kwargs: None)


def cli(*args: object):
    return CliRunner().invoke(app, [str(arg) for arg in args])


def ingest_cli(*args: object):
    """`vctmae ingest ARGS` without progress bars."""
    return cli("ingest", *args, "--no-progress")


def one_line_error(result, code: int, *needles: str) -> str:
    """The command failed with `code` and one `error:` line holding every needle, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert "Traceback" not in result.output
    return errors[0]


# Crop shape of the loader tests' shards: the loader is shape-generic, the split is not.
SMALL_CROP = (12, 4, 4)


def make_shards(
    root: Path, sizes: list[int], *, shape=SMALL_CROP, seed=0, prefix="train"
) -> dict[str, tuple]:
    """Shards `prefix-000000.tar`… with fresh random int16 crops; returns key → (crop, label)."""
    rng = np.random.default_rng(seed)
    truth = {}
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for shard, size in enumerate(sizes):
        samples = []
        for i in range(size):
            key = f"case{shard:02d}-{i}_L{i % 5 + 1}"
            crop = rng.integers(-2000, 3000, size=shape, dtype=np.int16)
            label = int(rng.integers(0, 2)) if (shard + i) % 4 else None
            samples.append((key, crop, label))
            truth[key] = (crop, -1 if label is None else label)
        shards.append(samples)
    write_shards(root, prefix, shards)
    return truth


def rank_loaders(shards, world_size: int = 2, **options) -> list[ShardLoader]:
    """One ShardLoader on the CPU for each rank of a `world_size`-process job."""
    return [
        ShardLoader(shards, device="cpu", rank=rank, world_size=world_size, **options)
        for rank in range(world_size)
    ]


def tree_bytes(out: Path) -> dict[str, str]:
    """sha256 of every published output file (the work folder and the timing report excluded)."""
    found = {}
    for folder, dirs, files in os.walk(out):
        dirs[:] = [d for d in dirs if d != ".ingest-work" and not d.startswith("part-")]
        for name in files:
            path = Path(folder) / name
            rel = path.relative_to(out).as_posix()
            if rel != "ingest-report.json":
                found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file with a header line."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_manifest(out: Path) -> list[dict[str, str]]:
    return read_rows(out / "manifest.csv")


TOTALSEG_MODULES = ("totalsegmentator", "totalsegmentator.python_api")


def use_totalsegmentator(monkeypatch, body: str | None, folder: Path | None = None) -> None:
    """For one test: TotalSegmentator not installed (`body` None), or a stand-in package in
    `folder` whose `python_api.totalsegmentator` runs `body`.

    Both module names go back to what they were when the test ends, whatever it imported
    (a stand-in left in `sys.modules` would answer a later test's import).
    """
    for name in TOTALSEG_MODULES:
        monkeypatch.setitem(sys.modules, name, None)  # None: "import fails"
    if body is None:
        return
    package = folder / "totalsegmentator"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "python_api.py").write_text(
        "def totalsegmentator(input, output, ml=False, task='total', roi_subset=None, "
        "fast=False, quiet=False, **options):\n" + textwrap.indent(textwrap.dedent(body), "    ")
    )
    monkeypatch.syspath_prepend(str(folder))
    for name in TOTALSEG_MODULES:
        del sys.modules[name]  # importable now; setitem above restores the original at teardown


NARROW_MODEL = {
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
    "decoder_embed_dim": 16,
    "decoder_depth": 1,
    "decoder_num_heads": 2,
}


def run_options(shards, out: Path, **changes) -> RunOptions:
    return RunOptions(
        shards=tuple(shards), out=out, model="tiny", model_overrides=NARROW_MODEL,
        loader=LoaderOptions(workers=0), device="cpu", progress=False, **changes,
    )  # fmt: skip


def short_trainer(kind: str, run: RunOptions):
    """The "pretrain" or "finetune" trainer of `run` for two epochs, one of them warmup, at
    batch 4."""
    from vctmae.train.finetune import finetune_trainer
    from vctmae.train.pretrain import pretrain_trainer

    if kind == "pretrain":
        return pretrain_trainer(
            PretrainConfig(run=run, epochs=2, warmup_epochs=1, batch_size=4, blr=0.05)
        )
    return finetune_trainer(
        FinetuneConfig(run=run, epochs=2, warmup_epochs=1, batch_size=4, lr=1e-3)
    )


def trainers(make, monkeypatch):
    """(eager, static) trainers of the same config; the static one as it would run on CUDA,
    without the capture."""
    eager = make("eager")
    monkeypatch.setattr("vctmae.train.run.capture_blocker", lambda options, info: None)
    static = make("static")
    monkeypatch.undo()
    assert eager.graphed is None and static.graphed is not None and not static.graphed.capture
    assert isinstance(static.run.optimizer.param_groups[0]["lr"], torch.Tensor)
    return eager, static


def run_steps(trainer, steps: int, accum: int) -> list[float]:
    # Dropout draws from torch's global RNG: both runs start from the same state.
    torch.manual_seed(11)
    trainer.run.model.train()
    batches = iter(trainer.run.loader)
    losses = []
    for _ in range(steps):
        micro = [next(batches) for _ in range(accum)]
        losses.append(float(trainer.train_step(micro).loss_sum))
    return losses


# fp32: the fused Adam kernel (static step) and the foreach one (eager step) round the same
# update in a different order, ~1e-7 relative per step. Parameters whose gradient is zero but
# for rounding (the attention's key bias: softmax ignores it) get Adam updates g / (√v + ε) that
# amplify that rounding up to ~1 % of a step (lr ≈ 8e-4 here): hence the absolute bound. A wrong
# draw, slot or learning rate moves every weight by whole steps, far beyond both bounds.
RTOL, ATOL = 1e-5, 1e-5


def assert_same_training(eager, static, losses_eager, losses_static) -> None:
    assert losses_static == pytest.approx(losses_eager, rel=RTOL)
    pairs = zip(
        eager.run.model.state_dict().items(), static.run.model.state_dict().values(), strict=True
    )
    for (name, a), b in pairs:
        torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL, msg=name)
    # The same randomness was drawn: both generators stand at the same place.
    assert torch.equal(eager.generator.get_state(), static.generator.get_state())
    assert eager.state.step == static.state.step


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def predict_config(checkpoint: Path, out: Path, **fields):
    """A `vctmae predict` run on the CPU without progress bars."""
    from vctmae.predict.config import PredictConfig

    return PredictConfig(checkpoint=checkpoint, out=out, device="cpu", progress=False, **fields)


def link_case(src: Path, name: str, ct: Path, seg: Path | None) -> None:
    """Case `name` of the --src folder `src`: ct/ (and seg/, unless `seg` is None) links to
    `ct` (and `seg`)."""
    (src / "ct").mkdir(parents=True, exist_ok=True)
    (src / "ct" / f"{name}.nii.gz").symlink_to(ct)
    if seg is not None:
        (src / "seg").mkdir(parents=True, exist_ok=True)
        (src / "seg" / f"{name}.nii.gz").symlink_to(seg)


def linked_source(src: Path, raw: Path, cases: Iterable[str]) -> Path:
    """A new --src folder `src` whose ct/ and seg/ link to the NIfTI files of `cases` in `raw`."""
    (src / "ct").mkdir(parents=True)
    (src / "seg").mkdir()
    for case in cases:
        for part in ("ct", "seg"):
            (src / part / f"{case}.nii.gz").symlink_to(raw / part / f"{case}.nii.gz")
    return src


def count_samples(shards: str | Sequence[str]) -> int:
    """Number of samples (crops) in the shards, as the loader's index counts them."""
    indexes, _ = index_shards(expand_shards(shards))
    return sum(len(index) for index in indexes)


def random_classifier(folder: Path) -> Path:
    """The shrunken tiny classifier with seeded random weights, saved in `folder` (its
    probabilities vary from crop to crop)."""
    from vctmae.model import build_classifier, save_model

    torch.manual_seed(0)
    model = build_classifier("tiny", num_classes=2, **SMALL_MODEL)
    return save_model(model, folder / "classifier.safetensors")


def eval_config(checkpoint: Path, shards, out: Path, **changes):
    """A `vctmae eval` run on the CPU, reading in the main process, without progress output."""
    from vctmae.infer.config import EvalConfig

    return EvalConfig(
        checkpoint=checkpoint,
        shards=tuple(shards),
        out=out,
        loader=LoaderOptions(workers=0),
        device="cpu",
        progress=False,
        **changes,
    )


def latest_checkpoint(run_dir: Path, kind: str) -> tuple[Path, Path] | None:
    """(weights, state) of the newest checkpoint of `kind` in a run folder, or None."""
    from vctmae.train.checkpoint import checkpoint_candidates

    candidates = checkpoint_candidates(run_dir, kind)
    return (candidates[0].weights, candidates[0].state) if candidates else None
