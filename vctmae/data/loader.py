"""Streaming loader: shards → int16 batches in worker processes → pinned → device (SPEC §4).

Chain: shard list → index (tar + .npy headers, once) → epoch plan (shard order,
rank/worker split) → buffer shuffle → batches of int16 crops read straight from
the shard into the batch buffer → pin → side-stream copy to the device.

Rank/worker split. Every rank and worker computes the same epoch plan from
(seed, epoch) and the shard index: the samples of all shards, in shard order
(shuffled per epoch when training), form one sequence of N samples, and global
worker g = rank × W + worker (W = max(1, num_workers), G = world_size × W) takes
the g-th contiguous slice. With many shards a slice is a run of whole shards
(streaming locality); with fewer shards than G workers several workers read
disjoint parts of one shard. Either way the slices are disjoint and cover the
sequence, so every sample is read exactly once per epoch, whatever the shard
count or shard sizes.

- Evaluation (training=False): slices of size ⌊N/G⌋ or ⌈N/G⌉ in shard order, no
  shuffle, partial last batches kept: every sample exactly once across ranks.
- Training (training=True): the sequence is also rotated by a random amount, then
  every worker takes exactly M = ⌊N / (G·B)⌋ · B samples, so every worker yields
  M/B full batches and every rank the same W·M/B batches — DDP ranks never wait on
  a rank that ran out. The N − G·M < G·B samples left over (drop_last) differ
  from epoch to epoch because of the rotation. Within its slice each worker
  buffer-shuffles the read order (a buffer of sample indexes, not decoded crops,
  so shuffling costs no memory), seeded by (seed, epoch, g).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vctmae.data.shards import ShardError, ShardIndex, expand_shards, index_shards, read_crop

BACKENDS = ("torch", "dali")


@dataclass(frozen=True)
class Batch:
    """int16 crops (B, 96, 96, 96), int64 labels (B,) (−1 = unlabeled) and the samples' keys."""

    crops: torch.Tensor
    labels: torch.Tensor
    keys: list[str]

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self, device: str | None = None) -> Batch:  # called by DataLoader's pin thread
        return Batch(self.crops.pin_memory(), self.labels.pin_memory(), self.keys)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            self.crops.to(device, non_blocking=non_blocking),
            self.labels.to(device, non_blocking=non_blocking),
            self.keys,
        )


# ----------------------------------------------------------------------------- epoch plan


def _rng(*seed: int) -> np.random.Generator:
    return np.random.default_rng(list(seed))


def epoch_plan(
    shard_sizes: Sequence[int],
    *,
    world_size: int,
    workers: int,
    batch_size: int,
    training: bool,
    seed: int,
    epoch: int,
) -> list[np.ndarray]:
    """Global sample ids (shard-major numbering) for each of the world_size × workers global workers.

    Pure and deterministic in its arguments; see the module docstring for the rules.
    """
    sizes = np.asarray(shard_sizes, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    total = int(sizes.sum())
    parts = world_size * workers
    if not training:
        return np.array_split(np.arange(total, dtype=np.int64), parts)
    rng = _rng(seed, epoch)
    order = rng.permutation(len(sizes))
    sequence = np.concatenate([np.arange(starts[i], starts[i] + sizes[i]) for i in order])
    sequence = np.roll(sequence, -int(rng.integers(total))) if total else sequence
    per_worker = total // (parts * batch_size) * batch_size
    return [sequence[g * per_worker : (g + 1) * per_worker] for g in range(parts)]


def buffer_shuffle(ids: np.ndarray, buffer_size: int, rng: np.random.Generator) -> np.ndarray:
    """WebDataset-style buffer shuffle of a read order: hold `buffer_size` ids, emit a random one, refill."""
    if buffer_size <= 1 or len(ids) <= 1:
        return ids
    buffer = list(ids[:buffer_size])
    out: list[int] = []
    picks = rng.integers(0, len(buffer), size=max(0, len(ids) - len(buffer)))
    for incoming, pick in zip(ids[len(buffer) :], picks, strict=True):
        out.append(buffer[pick])
        buffer[pick] = incoming
    rng.shuffle(buffer)
    out.extend(buffer)
    return np.asarray(out, dtype=np.int64)


# ----------------------------------------------------------------------------- worker side


class _CropStream(IterableDataset):
    """Yields Batch objects of this (rank, worker)'s slice of the epoch plan."""

    def __init__(
        self,
        indexes: list[ShardIndex],
        *,
        batch_size: int,
        training: bool,
        seed: int,
        rank: int,
        world_size: int,
        workers: int,
        shuffle_buffer: int,
        pin: bool,
    ):
        self.paths = [index.path for index in indexes]
        self.sizes = [len(index) for index in indexes]
        self.shard_of = np.concatenate(
            [np.full(len(ix), i, dtype=np.int32) for i, ix in enumerate(indexes)]
        )
        self.offsets = np.concatenate([index.offsets for index in indexes])
        self.labels = np.concatenate([index.labels for index in indexes])
        self.keys = [key for index in indexes for key in index.keys]
        self.shape = indexes[0].shape
        self.batch_size = batch_size
        self.training = training
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.workers = workers
        self.shuffle_buffer = shuffle_buffer
        self.pin = pin
        # Shared memory, so persistent worker processes see set_epoch() of the main process.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch.fill_(value)

    def plan(self, rank: int, worker: int) -> np.ndarray:
        """Sample ids global worker (rank, worker) reads this epoch, in read order."""
        parts = epoch_plan(
            self.sizes,
            world_size=self.world_size,
            workers=self.workers,
            batch_size=self.batch_size,
            training=self.training,
            seed=self.seed,
            epoch=self.epoch,
        )
        g = rank * self.workers + worker
        ids = parts[g]
        if self.training:
            ids = buffer_shuffle(ids, self.shuffle_buffer, _rng(self.seed, self.epoch, g, 1))
        return ids

    def batches_per_rank(self, rank: int) -> int:
        parts = epoch_plan(
            self.sizes,
            world_size=self.world_size,
            workers=self.workers,
            batch_size=self.batch_size,
            training=self.training,
            seed=self.seed,
            epoch=0,
        )
        mine = parts[rank * self.workers : (rank + 1) * self.workers]
        return sum(-(-len(ids) // self.batch_size) for ids in mine)

    def _empty(self, count: int, in_worker: bool) -> torch.Tensor:
        shape = (count, *self.shape)
        if in_worker:  # allocate in shared memory: handing it to the main process copies nothing
            nbytes = int(np.prod(shape)) * 2
            return torch.empty(0, dtype=torch.int16).set_(
                torch.UntypedStorage._new_shared(nbytes), 0, shape
            )
        return torch.empty(shape, dtype=torch.int16, pin_memory=self.pin)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        ids = self.plan(self.rank, worker)
        files: dict[int, int] = {}
        try:
            for start in range(0, len(ids), self.batch_size):
                chunk = ids[start : start + self.batch_size]
                crops = self._empty(len(chunk), in_worker=info is not None)
                out = crops.numpy()
                for row, sample in enumerate(chunk):
                    shard = int(self.shard_of[sample])
                    if shard not in files:
                        files[shard] = os.open(self.paths[shard], os.O_RDONLY)
                    try:
                        read_crop(files[shard], int(self.offsets[sample]), out[row])
                    except OSError as error:
                        raise ShardError(
                            self.paths[shard], f"reading {self.keys[sample]}: {error}"
                        ) from None
                labels = torch.from_numpy(self.labels[chunk])
                yield Batch(crops, labels, [self.keys[i] for i in chunk])
        finally:
            for fd in files.values():
                os.close(fd)


# ----------------------------------------------------------------------------- device side


class DevicePrefetcher:
    """Copies batches to a CUDA device on a side stream, keeping `depth` batches in flight.

    On a CPU device it is a pass-through (batches already live in host memory).
    """

    def __init__(self, batches: Iterable[Batch], device: torch.device | str, depth: int = 2):
        self.batches = batches
        self.device = torch.device(device)
        self.depth = max(1, depth)

    def __iter__(self) -> Iterator[Batch]:
        if self.device.type != "cuda":
            for batch in self.batches:
                yield batch if batch.crops.device == self.device else batch.to(self.device)
            return
        stream = torch.cuda.Stream(self.device)
        source = iter(self.batches)
        in_flight: deque[tuple[Batch, torch.cuda.Event]] = deque()

        def launch() -> None:
            batch = next(source, None)
            if batch is None:
                return
            with torch.cuda.stream(stream):
                moved = batch.to(self.device, non_blocking=True)
                done = torch.cuda.Event()
                done.record(stream)
            in_flight.append((moved, done))

        for _ in range(self.depth):
            launch()
        while in_flight:
            batch, done = in_flight.popleft()
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(done)
            # The tensors were allocated on the side stream but are used on the compute stream.
            batch.crops.record_stream(compute)
            batch.labels.record_stream(compute)
            launch()
            yield batch


# ----------------------------------------------------------------------------- public loader


def _default_device(device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def _default_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if world_size is None:
        world_size = torch.distributed.get_world_size() if initialised else 1
    if rank is None:
        rank = torch.distributed.get_rank() if initialised else 0
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    return rank, world_size


class ShardLoader:
    """`for batch in loader:` → Batch with int16 crops and labels already on `device`.

    training=True: shuffled (per epoch via set_epoch), drop_last, the same number of
    batches on every rank. training=False: shard order, every sample exactly once
    across ranks and workers, keys kept. See the module docstring for the split.
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        *,
        batch_size: int,
        training: bool,
        seed: int = 0,
        num_workers: int = 2,
        device: torch.device | str | None = None,
        backend: str = "torch",
        rank: int | None = None,
        world_size: int | None = None,
        skip_corrupt: bool = False,
        shuffle_buffer: int = 256,
        prefetch: int = 2,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if batch_size < 1:
            raise ValueError("batch_size must be ≥ 1")
        if num_workers < 0:
            raise ValueError("num_workers must be ≥ 0")
        self.shards = expand_shards(shards)
        self.batch_size = batch_size
        self.training = training
        self.seed = seed
        self.num_workers = num_workers
        self.device = _default_device(device)
        self.backend = backend
        self.rank, self.world_size = _default_world(rank, world_size)
        self.prefetch = prefetch
        self.epoch = 0
        indexes, self.skipped = index_shards(self.shards, skip_corrupt=skip_corrupt)
        if not indexes:
            raise ShardError(
                self.shards[0] if len(self.shards) == 1 else "<shards>", "no usable samples"
            )
        self.indexes = indexes
        self.num_samples = sum(len(index) for index in indexes)
        workers = max(1, num_workers)
        if training and self.num_samples < self.world_size * workers * batch_size:
            raise ValueError(
                f"{self.num_samples} samples are too few for batch_size {batch_size} × "
                f"{self.world_size} rank(s) × {workers} worker(s); lower one of them"
            )
        self._stream = _CropStream(
            indexes,
            batch_size=batch_size,
            training=training,
            seed=seed,
            rank=self.rank,
            world_size=self.world_size,
            workers=workers,
            shuffle_buffer=shuffle_buffer,
            pin=self.device.type == "cuda" and num_workers == 0,
        )
        self._length = self._stream.batches_per_rank(self.rank)
        self._workers: DataLoader | None = None

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for `epoch` (training); call before iterating, on every rank."""
        self.epoch = epoch
        self._stream.epoch = epoch

    def __len__(self) -> int:
        return self._length

    def sample_ids(self, rank: int | None = None, worker: int = 0) -> list[str]:
        """Keys a (rank, worker) reads this epoch, in its read order (for tests and debugging)."""
        ids = self._stream.plan(self.rank if rank is None else rank, worker)
        return [self._stream.keys[i] for i in ids]

    def _host_batches(self) -> Iterable[Batch]:
        if self.backend == "dali":
            from vctmae.data.dali import dali_batches

            return dali_batches(self)
        if self.num_workers == 0:
            return iter(self._stream)
        if self._workers is None:  # persistent: worker start-up is paid once, not every epoch
            self._workers = DataLoader(
                self._stream,
                batch_size=None,
                num_workers=self.num_workers,
                pin_memory=self.device.type == "cuda",
                prefetch_factor=2,
                persistent_workers=True,
            )
        return self._workers

    def __iter__(self) -> Iterator[Batch]:
        return iter(DevicePrefetcher(self._host_batches(), self.device, depth=self.prefetch))
