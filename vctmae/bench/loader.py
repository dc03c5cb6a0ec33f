"""`vctmae bench loader`: shards → device-ready batches vs the paper code's per-sample NIfTI chain.

Everything is measured in one run on the same crops: the crops are cut from the
real CT fixture (resampled to 1 mm, so they compress like real crops; random
smooth volumes when the fixture is absent), written once as shards and once as
one NIfTI file per crop (.nii.gz and .nii). Every file is read once before timing
so the page cache is warm for every contender. Each contender runs one untimed
epoch, then `repeats` timed measurements of whole epochs, each as many epochs as
take at least `min_seconds` (2 s by default: long enough to matter, whatever the
machine); the median rate is reported. The streaming loader is also measured at
the larger batches training uses (64: finetuning; 256: the best GPU batch).
"""

from __future__ import annotations

import io
import os
import statistics
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vctmae.bench.report import Result, write_report
from vctmae.data.frames import random_offsets, sample_frames
from vctmae.data.loader import ShardLoader
from vctmae.data.shards import iter_raw

# The real-CT fixture beside the checkout (or $VCTMAE_REAL_CT); random smooth volumes without it.
REAL_CT = (
    Path(os.environ["VCTMAE_REAL_CT"]) / "ct.nii.gz"
    if "VCTMAE_REAL_CT" in os.environ
    else Path(__file__).resolve().parents[3] / "shared/data/real-ct/ct.nii.gz"
)
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
    dali: bool = True
    device: str | None = None
    real_ct: Path = field(default=REAL_CT)

    def __post_init__(self) -> None:
        if self.samples < self.batch_size * 2 * max(1, *self.workers):
            raise ValueError("samples too few for the batch size and worker counts")
        if self.repeats < 1:
            raise ValueError("repeats must be ≥ 1")


def quick_config(**overrides) -> LoaderBenchConfig:
    """About a minute on a 2-core machine."""
    settings = {"samples": 64, "shard_size": 16, "repeats": 2, "min_seconds": 0.5,
                "large_batches": (32,)}  # fmt: skip
    return LoaderBenchConfig(**{**settings, **overrides})


# ----------------------------------------------------------------------------- data


def make_crops(count: int, real_ct: Path, seed: int = 0) -> np.ndarray:
    """int16 (count, 96, 96, 96) crops cut at random places from the real CT at 1 mm."""
    rng = np.random.default_rng(seed)
    if real_ct.exists():
        import nibabel as nib
        from scipy import ndimage

        image = nib.load(real_ct)
        volume = np.asarray(image.dataobj, dtype=np.float32)
        volume = ndimage.zoom(volume, image.header.get_zooms()[:3], order=1)  # → 1 mm voxels
    else:
        from scipy import ndimage

        volume = (
            ndimage.gaussian_filter(rng.normal(0, 400, size=(192, 192, 192)).astype(np.float32), 3)
            * 20
        )
    pad = [(0, max(0, SIZE - n)) for n in volume.shape]
    volume = np.pad(volume, pad, constant_values=-1024).astype(np.int16)
    crops = np.empty((count, SIZE, SIZE, SIZE), dtype=np.int16)
    for i in range(count):
        corner = [int(rng.integers(0, n - SIZE + 1)) for n in volume.shape]
        crops[i] = volume[tuple(slice(c, c + SIZE) for c in corner)]
    return crops


def write_dataset(
    root: Path, crops: np.ndarray, shard_size: int
) -> tuple[list[str], list[Path], list[Path]]:
    """Shards in ingest's format, plus one .nii.gz and one .nii per crop. Returns their paths."""
    import nibabel as nib

    from vctmae.bench.shards import write_shards

    groups = [
        [
            (f"crop{i:05d}_L1", crops[i], 0)
            for i in range(start, min(start + shard_size, len(crops)))
        ]
        for start in range(0, len(crops), shard_size)
    ]
    shards = [str(path) for path in write_shards(root, "train", groups)]
    gz, raw = [], []
    (root / "nifti").mkdir(parents=True, exist_ok=True)
    for i, crop in enumerate(crops):
        image = nib.Nifti1Image(crop, np.eye(4))
        gz.append(root / "nifti" / f"crop{i:05d}.nii.gz")
        raw.append(root / "nifti" / f"crop{i:05d}.nii")
        nib.save(image, gz[-1])
        nib.save(image, raw[-1])
    return shards, gz, raw


# ----------------------------------------------------------------------------- timing


def _rate(epoch: Callable[[], int], repeats: int, min_seconds: float = 0.0) -> float:
    """Median samples/s over `repeats` measurements after one untimed warm-up epoch; each
    measurement runs whole epochs until at least `min_seconds` have passed."""
    epoch()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        count = 0
        while True:
            count += epoch()
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        rates.append(count / elapsed)
    return statistics.median(rates)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(
            device
        )  # deliberate: the epoch's batches must really be on the device


def _loader_epoch(loader: ShardLoader, frames: bool = False) -> Callable[[], int]:
    def epoch() -> int:
        count = 0
        for batch in loader:
            if frames:
                sample_frames(batch.crops, random_offsets(len(batch), device=batch.crops.device))
            count += len(batch)
        _sync(loader.device)
        return count

    return epoch


def _raw_epoch(shards: list[str], npload: bool = False) -> Callable[[], int]:
    def epoch() -> int:
        count = 0
        if npload:
            for path in shards:
                with tarfile.open(path, mode="r:") as tar:
                    for member in tar:
                        if member.name.endswith(".npy"):
                            np.load(io.BytesIO(tar.extractfile(member).read()))
                            count += 1
            return count
        for _ in iter_raw(shards):
            count += 1
        return count

    return epoch


def _reference_epoch(paths: list[Path], workers: int, batch_size: int) -> Callable[[], int]:
    from torch.utils.data import DataLoader

    from vctmae.bench.nifti_chain import ReferenceNiftiDataset

    dataset = ReferenceNiftiDataset(paths, [0] * len(paths))

    def epoch() -> int:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers)
        return sum(len(images) for images, _ in loader)

    return epoch


# ----------------------------------------------------------------------------- benchmark


def run_loader_bench(
    config: LoaderBenchConfig, *, json_path: Path | str | None = None, workdir: Path | None = None
) -> Path:
    """Measure every contender on the same crops and write the report; returns the JSON path."""
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(
            1
        )  # on a small shared CPU, intra-op threads in sample_frames only contend
    try:
        rates = _measure(config, device, workdir)
    finally:
        torch.set_num_threads(threads)
    results = [Result(name=name, value=value, unit="samples/s") for name, value in rates.items()]
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
        "reference": "paper-code chain per sample in a DataLoader with the same worker count: NIfTI load, "
        "HU scale, foreground crop, pad, 16 frames, RGB, flip",
        "raw_read": "tarfile + np.frombuffer on each .npy member (raw_read_npload: np.load on BytesIO)",
    }
    return write_report(
        "loader", results, _ratios(rates, config), json_path=json_path, config=settings
    )


def _measure(
    config: LoaderBenchConfig, device: torch.device, workdir: Path | None
) -> dict[str, float]:
    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        crops = make_crops(config.samples, config.real_ct)
        shards, gz, raw = write_dataset(Path(tmp), crops, config.shard_size)
        for path in [*shards, *gz, *raw]:  # warm the page cache for everybody
            Path(path).read_bytes()
        timed = {"repeats": config.repeats, "min_seconds": config.min_seconds}
        rates["raw_read"] = _rate(_raw_epoch(shards), **timed)
        rates["raw_read_npload"] = _rate(_raw_epoch(shards, npload=True), **timed)
        for workers in config.workers:
            loader = ShardLoader(
                shards,
                batch_size=config.batch_size,
                training=True,
                num_workers=workers,
                device=device,
            )
            rates[f"torch_w{workers}"] = _rate(_loader_epoch(loader), **timed)
            if workers == 0:
                rates["torch_w0_frames"] = _rate(_loader_epoch(loader, frames=True), **timed)
            loader.close()
            if workers not in (0, max(config.workers)):
                continue
            for batch in config.large_batches:
                if config.samples < batch * max(1, workers):
                    continue
                loader = ShardLoader(
                    shards, batch_size=batch, training=True, num_workers=workers, device=device
                )
                rates[f"torch_w{workers}_b{batch}"] = _rate(_loader_epoch(loader), **timed)
                loader.close()
        if config.dali:
            from vctmae.data.dali import dali_available

            if dali_available():
                threads = max(config.workers)
                loader = ShardLoader(
                    shards,
                    batch_size=config.batch_size,
                    training=True,
                    num_workers=threads,
                    device=device,
                    backend="dali",
                )
                rates[f"dali_t{threads}"] = _rate(_loader_epoch(loader), **timed)
        reference_repeats = max(1, config.repeats - 1)
        for workers in config.workers:
            rates[f"reference_nii_gz_w{workers}"] = _rate(
                _reference_epoch(gz, workers, config.batch_size), reference_repeats
            )
        rates["reference_nii_w0"] = _rate(
            _reference_epoch(raw, 0, config.batch_size), reference_repeats
        )
    return rates


def _ratios(rates: dict[str, float], config: LoaderBenchConfig) -> dict[str, float]:
    ratios = {}
    for workers in config.workers:
        reference = rates[f"reference_nii_gz_w{workers}"]
        ratios[f"torch_w{workers}_over_reference_nii_gz_w{workers}"] = (
            rates[f"torch_w{workers}"] / reference
        )
        ratios[f"torch_w{workers}_over_raw_read"] = rates[f"torch_w{workers}"] / rates["raw_read"]
    if 0 in config.workers:
        ratios["torch_w0_over_reference_nii_gz"] = rates["torch_w0"] / rates["reference_nii_gz_w0"]
        ratios["torch_w0_over_reference_nii"] = rates["torch_w0"] / rates["reference_nii_w0"]
        ratios["torch_w0_frames_over_reference_nii_gz"] = (
            rates["torch_w0_frames"] / rates["reference_nii_gz_w0"]
        )
    for name in rates:
        if name.startswith("torch_w") and "_b" in name:
            ratios[f"{name}_over_raw_read"] = rates[name] / rates["raw_read"]
        if name.startswith("dali_t"):
            threads = int(name.removeprefix("dali_t"))
            ratios[f"{name}_over_raw_read"] = rates[name] / rates["raw_read"]
            if f"reference_nii_gz_w{threads}" in rates:
                ratios[f"{name}_over_reference_nii_gz_w{threads}"] = (
                    rates[name] / rates[f"reference_nii_gz_w{threads}"]
                )
    return ratios
