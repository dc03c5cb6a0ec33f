"""`vctmae bench loader`: shards → device-ready batches vs the paper code's own MONAI data path.

Everything is measured in one run on the same crops: the crops are cut around the
vertebrae of the real CT fixture (resampled to 1 mm, so they compress like real
crops; a random smooth volume when the fixture is absent), written once as
shards and once as the paper code stores them, a NIfTI image and label map per
vertebra (`benchmarks/peers/paper_monai.py` reads them as that code does, with
MONAI). The floor is the raw tar read of the shards. Every file is read once
before timing so the page cache is warm for every contender. Each contender runs
one untimed epoch, then `repeats` timed measurements of whole epochs, each as
many epochs as take at least `min_seconds` (2 s by default: long enough to
matter, whatever the machine); the median rate is reported. The streaming loader
is also measured at the larger batches training uses (64: finetuning; 256: the
best GPU batch).
"""

from __future__ import annotations

import io
import statistics
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vctmae.bench.peers import load_peer, monai_version
from vctmae.bench.report import REAL_CT_DIR, Report, bench_device, time_calls
from vctmae.data.frames import random_offsets, sample_frames
from vctmae.data.loader import ShardLoader
from vctmae.data.options import LoaderOptions
from vctmae.data.shards import iter_raw
from vctmae.errors import UsageError

# The real-CT fixture (`vctmae.bench.report.REAL_CT_DIR`); random smooth volumes without it.
REAL_CT = REAL_CT_DIR / "ct.nii.gz"
SIZE = 96


@dataclass(frozen=True, kw_only=True)
class LoaderBenchConfig:
    samples: int = 256
    shard_size: int = 32
    batch_size: int = 8
    repeats: int = 3
    min_seconds: float = 2.0
    # Batch sizes the streaming loader is measured at besides `batch_size` (0 workers and the most).
    large_batches: tuple[int, ...] = (64, 256)
    workers: tuple[int, ...] = (0, 1, 2)
    # The paper's MONAI path: its own default (0 workers) and vctmae's worker count.
    paper_workers: tuple[int, ...] = (0, LoaderOptions().workers)
    dali: bool = True
    device: str | None = None
    real_ct: Path = field(default=REAL_CT)

    def __post_init__(self) -> None:
        # Two batches for each worker, so that every worker delivers some.
        least = self.batch_size * 2 * max(1, *self.workers)
        if self.samples < least:
            raise UsageError(
                f"--samples {self.samples} is too few for --batch-size {self.batch_size} at "
                f"{max(self.workers)} workers: at least {least}"
            )
        if not set(self.paper_workers) <= set(self.workers):
            raise UsageError("the paper's path is compared at worker counts the loader runs at")
        if self.repeats < 1:
            raise UsageError("repeats must be ≥ 1")


def quick_config(**overrides) -> LoaderBenchConfig:
    """About a minute on a 2-core machine."""
    settings = {"samples": 64, "shard_size": 16, "repeats": 2, "min_seconds": 0.5,
                "large_batches": (32,)}  # fmt: skip
    return LoaderBenchConfig(**{**settings, **overrides})


# ----------------------------------------------------------------------------- data


def make_crops(
    count: int, real_ct: Path, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """int16 (count, 96, 96, 96) crops of the real CT at 1 mm, each centred near one of its
    vertebrae (a few voxels off, at random), with the label map cut at the same place and
    the vertebra's label value. Without the fixture: a random smooth volume, one box label."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    if real_ct.exists():
        import nibabel as nib

        from vctmae.ingest.levels import TOTALSEG

        image = nib.load(real_ct)
        zoom = image.header.get_zooms()[:3]  # → 1 mm voxels
        volume = ndimage.zoom(np.asarray(image.dataobj, dtype=np.float32), zoom, order=1)
        labels = ndimage.zoom(
            np.asarray(nib.load(real_ct.with_name("seg.nii.gz")).dataobj), zoom, order=0
        )
        found = np.bincount(labels.ravel(), minlength=max(TOTALSEG) + 1)
        values = [v for v in TOTALSEG if found[v] >= 1000]  # whole vertebrae, not slivers
    else:
        noise = rng.normal(0, 400, size=(192, 192, 192)).astype(np.float32)
        volume = ndimage.gaussian_filter(noise, 3) * 20
        labels = np.zeros(volume.shape, dtype=np.uint8)
        labels[70:120, 60:130, 70:120] = 1
        values = [1]
    pad = [(0, max(0, SIZE - n)) for n in volume.shape]
    volume = np.pad(volume, pad, constant_values=-1024).astype(np.int16)
    labels = np.pad(labels, pad)
    centres = {v: np.argwhere(labels == v).mean(axis=0) for v in values}
    crops = np.empty((count, SIZE, SIZE, SIZE), dtype=np.int16)
    label_maps = np.empty((count, SIZE, SIZE, SIZE), dtype=labels.dtype)
    chosen = []
    for i in range(count):
        value = values[i % len(values)]
        centre = centres[value] + rng.integers(-6, 7, size=3)
        corner = [
            int(np.clip(round(c) - SIZE // 2, 0, n - SIZE))
            for c, n in zip(centre, volume.shape, strict=True)
        ]
        box = tuple(slice(c, c + SIZE) for c in corner)
        crops[i], label_maps[i] = volume[box], labels[box]
        chosen.append(value)
    return crops, label_maps, chosen


def write_dataset(
    root: Path, crops: np.ndarray, label_maps: np.ndarray, values: list[int], shard_size: int
) -> tuple[list[str], list[dict]]:
    """Shards in ingest's format, and the same crops as the paper code stores them (a NIfTI
    image and label map per vertebra). Returns the shard paths and the paper's records."""
    from vctmae.ingest.writers import write_shards

    groups = [
        [
            (f"crop{i:05d}_L1", crops[i], 0)
            for i in range(start, min(start + shard_size, len(crops)))
        ]
        for start in range(0, len(crops), shard_size)
    ]
    shards = [str(path) for path in write_shards(root, "train", groups)]
    records = load_peer("paper_monai").write_records(root / "paper", crops, label_maps, values)
    return shards, records


# ----------------------------------------------------------------------------- timing


def _loader_epoch(loader: ShardLoader, frames: bool = False) -> Callable[[], int]:
    """One epoch of the streaming loader (`frames`: each batch also turned into model input)."""

    def epoch() -> int:
        count = 0
        for batch in loader:
            if frames:
                sample_frames(batch.crops, random_offsets(len(batch), device=batch.crops.device))
            count += len(batch)
        return count

    return epoch


def _raw_epoch(shards: list[str], npload: bool = False) -> Callable[[], int]:
    """The floor: one read of every crop in the shards (`npload`: each through np.load)."""

    def epoch() -> int:
        if not npload:
            return sum(1 for _ in iter_raw(shards))
        count = 0
        for path in shards:
            with tarfile.open(path, mode="r:") as tar:
                for member in tar:
                    if member.name.endswith(".npy"):
                        np.load(io.BytesIO(tar.extractfile(member).read()))
                        count += 1
        return count

    return epoch


# ----------------------------------------------------------------------------- benchmark


def run_loader_bench(
    config: LoaderBenchConfig, *, json_path: Path | str | None = None, workdir: Path | None = None
) -> Path:
    """Measure every contender on the same crops and write the report; returns the JSON path."""
    load_peer("paper_monai")  # before any work: a missing peer stops the benchmark at once
    report = Report("loader")
    device = bench_device(config.device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # On a small shared CPU, intra-op threads in sample_frames only contend.
        torch.set_num_threads(1)
    try:
        rates = _measure(config, device, workdir)
    finally:
        torch.set_num_threads(threads)
    for name, value in rates.items():
        report.add(name, value, "samples/s")
    report.ratios.update(_ratios(rates, config))
    settings = {
        "samples": config.samples,
        "shard_size": config.shard_size,
        "batch_size": config.batch_size,
        "repeats": config.repeats,
        "workers": list(config.workers),
        "device": str(device),
        "torch_threads": 1 if device.type == "cpu" else threads,
        "crops": "real CT fixture at 1 mm"
        if config.real_ct.exists()
        else "synthetic smooth volumes",
        "min_seconds": config.min_seconds,
        "large_batches": list(config.large_batches),
        "statistic": "median samples/s over timed runs of whole epochs (each >= min_seconds) "
        "after one warm-up epoch; page cache warm",
        "candidate": "ShardLoader(training=True): int16 batches on the device; "
        "torch_w0_frames adds sample_frames (float model input)",
        "paper_monai": f"the paper code's data path (github lbuess/Video-CT_MAE, pretraining): "
        f"MONAI {monai_version()} Dataset of per-vertebra NIfTI image + label map (.nii.gz), "
        "LoadImaged, EnsureChannelFirstd, label map == level -> mask, ScaleIntensityRanged "
        "(-1000..1000 -> 0..1, clip), CropForegroundd on the mask (margin 0/16/100), "
        "ResizeWithPadOrCropd, its 16-frame sampling + RGB, RandFlipd; torch DataLoader, "
        "RandomSampler, drop_last, same batch size, workers as named (benchmarks/peers/paper_monai.py)",
        "paper_workers": list(config.paper_workers),
        "raw_read": "the floor: tarfile + np.frombuffer on each .npy member (raw_read_npload: np.load on BytesIO)",
    }
    return report.write(json_path=json_path, config=settings)


def _measure(
    config: LoaderBenchConfig, device: torch.device, workdir: Path | None
) -> dict[str, float]:
    """samples/s of every contender (see the module docstring), by name."""

    def rate(epoch: Callable[[], int]) -> float:
        samples = epoch()  # the untimed warm-up epoch
        seconds = time_calls(
            epoch, device=device, warmup=0, repeats=config.repeats, min_seconds=config.min_seconds
        )
        return samples / statistics.median(seconds)

    def loader_rate(batch_size: int, workers: int, frames: bool = False, **more: Any) -> float:
        loader = ShardLoader(
            shards, batch_size=batch_size, training=True, num_workers=workers, device=device, **more
        )
        try:
            return rate(_loader_epoch(loader, frames))
        finally:
            loader.close()

    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        crops, label_maps, values = make_crops(config.samples, config.real_ct)
        shards, records = write_dataset(Path(tmp), crops, label_maps, values, config.shard_size)
        paper_files = [record[key] for record in records for key in ("image", "mask")]
        for path in [*shards, *paper_files]:  # warm the page cache for everybody
            Path(path).read_bytes()
        rates["raw_read"] = rate(_raw_epoch(shards))
        rates["raw_read_npload"] = rate(_raw_epoch(shards, npload=True))
        for workers in config.workers:
            rates[f"torch_w{workers}"] = loader_rate(config.batch_size, workers)
            if workers == 0:
                rates["torch_w0_frames"] = loader_rate(config.batch_size, 0, frames=True)
            if workers not in (0, max(config.workers)):
                continue
            for batch in config.large_batches:
                if config.samples >= batch * max(1, workers):
                    rates[f"torch_w{workers}_b{batch}"] = loader_rate(batch, workers)
        if config.dali:
            from vctmae.data.dali import dali_available

            if dali_available():
                threads = max(config.workers)
                rates[f"dali_t{threads}"] = loader_rate(config.batch_size, threads, backend="dali")
        paper_epoch = load_peer("paper_monai").paper_epoch
        for workers in config.paper_workers:
            epoch = paper_epoch(
                records, batch_size=config.batch_size, workers=workers, device=device
            )
            rates[f"paper_monai_w{workers}"] = rate(epoch)
    return rates


def _ratios(rates: dict[str, float], config: LoaderBenchConfig) -> dict[str, float]:
    """Each loader rate over the paper's MONAI path at the same worker count and over the floor;
    `loader_over_paper_monai_path` is the one at vctmae's own worker count."""
    ratios = {}
    for workers in config.paper_workers:
        ratio = rates[f"torch_w{workers}"] / rates[f"paper_monai_w{workers}"]
        ratios[f"loader_over_paper_monai_path_w{workers}"] = ratio
        if workers == LoaderOptions().workers:
            ratios["loader_over_paper_monai_path"] = ratio
    if 0 in config.paper_workers:
        ratios["loader_frames_w0_over_paper_monai_path_w0"] = (
            rates["torch_w0_frames"] / rates["paper_monai_w0"]
        )
    for name in rates:
        if name.startswith(("torch_w", "dali_t")):
            ratios[f"{name}_over_raw_read"] = rates[name] / rates["raw_read"]
    return ratios
