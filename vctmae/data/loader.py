"""Streaming loader: shards → int16 batches in worker processes → pinned → device.

Chain: shard list → index (tar + .npy headers, once) → epoch plan (shard order,
rank/worker split) → buffer shuffle → batches of int16 crops read straight from
the shard into the batch buffer → pin → side-stream copy to the device.

Rank split, then worker deal. Every rank and worker computes the same epoch
plan from (seed, epoch) and the shard index: the samples of all shards, in shard
order (shuffled per epoch when training), form one sequence of N samples, and
rank r takes the r-th contiguous slice. The rank's slice is cut into batches,
and its batches are dealt to its W = max(1, num_workers) loader workers round
robin — batch j to worker j mod W. DataLoader hands worker outputs over in that
same round-robin order, so a rank yields its batches in plan order whatever W
is: the number of batches per epoch, their contents and their order never
depend on `--workers` (0, 1, 2, … give identical epochs).

- Evaluation (training=False): slices of size ⌊N/R⌋ or ⌈N/R⌉ (R = world size)
  in shard order, no shuffle, the rank's last batch partial: every sample exactly
  once across ranks.
- Training (training=True): the sequence is also rotated by a random amount, then
  every rank takes exactly M = ⌊N / (R·B)⌋ · B samples, so every rank yields the
  same M/B full batches — DDP ranks never wait in an all-reduce on a rank that ran
  out. The N − R·M < R·B samples left over (drop_last) differ from epoch to epoch
  because of the rotation. Each rank buffer-shuffles its slice's read order (a
  buffer of sample indexes, not decoded crops, so shuffling costs no memory),
  seeded by (seed, epoch, rank), before it is cut into batches.
- In evaluation ranks may differ by one batch: gather predictions at the end
  instead of stepping in lockstep.

Hand-over. Worker processes persist across epochs (set_epoch reaches them through
shared memory) and write crops into a per-worker ring of reused shared-memory
batch buffers (`_BatchRing`), sending only the slot number, keys and labels. On
CUDA the ring is page-locked once, so the side-stream copy reads it directly;
on CPU the main process copies the batch out. With num_workers=0 the main
process reads straight into a (pinned, on CUDA) batch tensor.

Resume. `state_dict()` records (epoch, batches handed out); `load_state_dict()`
makes the next iteration start at the next batch of the plan without reading the
earlier ones (worker i then takes batches start + i, start + i + W, …).

The DataLoader draws its workers' base seed from a generator of its own, not from
torch's global RNG: a resumed run creates its loader iterators afresh, and a
draw from the global stream there would shift the randomness (dropout) of every
later step.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import InitVar, dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vctmae.data.batch import BACKENDS, CACHES, Batch
from vctmae.data.shards import (
    ShardError,
    ShardIndex,
    expand_shards,
    index_shards,
    read_crop,
    select_levels,
    shard_label,
)

_PREFETCH_FACTOR = 2  # batches each worker process reads ahead


# ----------------------------------------------------------------------------- epoch plan


def _rng(*seed: int) -> np.random.Generator:
    return np.random.default_rng(list(seed))


def epoch_plan(
    shard_sizes: Sequence[int],
    *,
    world_size: int,
    batch_size: int,
    training: bool,
    seed: int,
    epoch: int,
) -> list[np.ndarray]:
    """Global sample ids (shard-major numbering) of each rank's slice, before its read shuffle.

    Pure and deterministic in its arguments; see the module docstring for the rules.
    """
    sizes = np.asarray(shard_sizes, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    total = int(sizes.sum())
    if not training:
        return np.array_split(np.arange(total, dtype=np.int64), world_size)
    rng = _rng(seed, epoch)
    order = rng.permutation(len(sizes))
    sequence = np.concatenate([np.arange(starts[i], starts[i] + sizes[i]) for i in order])
    sequence = np.roll(sequence, -int(rng.integers(total))) if total else sequence
    per_rank = total // (world_size * batch_size) * batch_size
    return [sequence[r * per_rank : (r + 1) * per_rank] for r in range(world_size)]


def worker_batches(batches: int, *, workers: int, worker: int, start: int = 0) -> range:
    """Which of a rank's `batches` batches `worker` reads, dealt round robin from batch `start`.

    DataLoader collects from its workers in turn (0, 1, …, W−1, 0, …), passing over those
    that have finished; dealing batch start + k to worker k mod W makes that hand-over
    yield the batches in plan order.
    """
    return range(start + worker, batches, workers)


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


@dataclass(kw_only=True, eq=False)
class _CropStream(IterableDataset):
    """Yields Batch objects of this (rank, worker)'s slice of the epoch plan."""

    indexes: InitVar[list[ShardIndex]]
    batch_size: int
    training: bool
    seed: int
    rank: int
    world_size: int
    workers: int
    shuffle_buffer: int
    pin: bool

    def __post_init__(self, indexes: list[ShardIndex]) -> None:
        self.paths = [index.path for index in indexes]
        self.sizes = [len(index) for index in indexes]
        self.shard_of = np.concatenate(
            [np.full(len(ix), i, dtype=np.int32) for i, ix in enumerate(indexes)]
        )
        self.offsets = np.concatenate([index.offsets for index in indexes])
        self.labels = np.concatenate([index.labels for index in indexes])
        self.boxes = np.concatenate([index.boxes for index in indexes])
        self.keys = [key for index in indexes for key in index.keys]
        self.shape = indexes[0].shape
        self.ring: _BatchRing | None = None
        # Shared memory, so persistent worker processes see set_epoch() of the main process.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        # The plan batch the next iteration starts at (resuming mid-epoch; 0 otherwise).
        self.start = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch.fill_(value)

    def plan(self, rank: int) -> list[np.ndarray]:
        """The batches (sample ids, in read order) rank `rank` yields this epoch, in order."""
        ids = epoch_plan(
            self.sizes,
            world_size=self.world_size,
            batch_size=self.batch_size,
            training=self.training,
            seed=self.seed,
            epoch=self.epoch,
        )[rank]
        if self.training:
            ids = buffer_shuffle(ids, self.shuffle_buffer, _rng(self.seed, self.epoch, rank, 1))
        return [ids[i : i + self.batch_size] for i in range(0, len(ids), self.batch_size)]

    def read_into(self, chunk: np.ndarray, out: np.ndarray, files: dict[int, int]) -> None:
        """Read the crops of samples `chunk` into the int16 array `out`, opening shards into
        `files` (shard number → file descriptor; the caller closes them)."""
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

    def __iter__(self) -> Iterator[Batch | _SlotBatch]:
        info = get_worker_info()
        worker = info.id if info is not None else 0  # owns ring row `worker`
        batches = self.plan(self.rank)
        mine = worker_batches(
            len(batches), workers=self.workers, worker=worker, start=int(self.start)
        )
        files: dict[int, int] = {}
        try:
            for number in mine:
                chunk = batches[number]
                # numpy: a torch tensor would cross processes via its own shm file
                labels, boxes = self.labels[chunk], self.boxes[chunk]
                keys = [self.keys[i] for i in chunk]
                if self.ring is not None and info is not None:
                    slot = self.ring.acquire(worker)
                    self.read_into(chunk, self.ring.crops[worker, slot].numpy(), files)
                    yield _SlotBatch(worker, slot, labels, keys, boxes)
                else:
                    crops = torch.empty(
                        (len(chunk), *self.shape), dtype=torch.int16, pin_memory=self.pin
                    )
                    self.read_into(chunk, crops.numpy(), files)
                    yield Batch(crops, torch.from_numpy(labels), keys, torch.from_numpy(boxes))
        finally:
            for fd in files.values():
                os.close(fd)


@dataclass(frozen=True)
class _SlotBatch:
    """What a worker sends back: which ring slot holds the crops (the crops themselves stay put)."""

    worker: int
    slot: int
    labels: np.ndarray
    keys: list[str]
    boxes: np.ndarray


class _BatchRing:
    """Per-worker batch buffers in shared memory, reused every batch.

    Handing each batch over in a fresh shared-memory tensor costs the kernel a
    page-zeroing pass plus page faults in two processes — more than the read
    itself. Instead each worker owns `slots` fixed buffers; it fills a free one
    and sends only its slot number, and the main process marks the slot free
    again once the crops have been copied out (to the device, or into a fresh
    CPU tensor). On CUDA the ring is page-locked once (cudaHostRegister), so the
    device copy reads straight from it.
    """

    def __init__(self, workers: int, slots: int, batch_size: int, shape: tuple[int, ...]):
        self.crops = torch.empty(
            (workers, slots, batch_size, *shape), dtype=torch.int16
        ).share_memory_()
        self.free = torch.ones((workers, slots), dtype=torch.int32).share_memory_()
        self.pinned = False

    def acquire(self, worker: int) -> int:
        """Worker side: wait for a free slot of `worker`, mark it used."""
        parent = os.getppid()
        free = self.free[worker]
        while True:
            for slot in range(free.numel()):
                if int(free[slot]) == 1:
                    free[slot] = 0
                    return slot
            if os.getppid() != parent:  # main process gone: stop waiting
                raise RuntimeError("loader main process exited")
            time.sleep(0.0002)

    def view(self, worker: int, slot: int, count: int) -> torch.Tensor:
        return self.crops[worker, slot, :count]

    def release(self, worker: int, slot: int) -> None:
        self.free[worker, slot] = 1

    def release_all(self) -> None:
        self.free.fill_(1)

    def pin(self) -> None:
        """Page-lock the ring so non_blocking device copies read it directly (best effort)."""
        if self.pinned or not torch.cuda.is_available():
            return
        cudart = torch.cuda.cudart()
        nbytes = self.crops.numel() * self.crops.element_size()
        if int(cudart.cudaHostRegister(self.crops.data_ptr(), nbytes, 0)) != 0:
            cudart.cudaGetLastError()  # clear the error so later CUDA calls do not report it
            return
        self.pinned = True
        # Unregister before the shared memory is unmapped; the finalizer keeps `crops` alive until then.
        weakref.finalize(self, _unregister, self.crops)


def _unregister(crops: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(crops.data_ptr())


@dataclass(frozen=True)
class _Leased:
    """A host batch whose crops live in a ring slot until `release` is called."""

    batch: Batch
    release: Callable[[], None]


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
            for item in self.batches:
                batch = item.batch if isinstance(item, _Leased) else item
                moved = batch if batch.crops.device == self.device else batch.to(self.device)
                if isinstance(item, _Leased):
                    if moved.crops.data_ptr() == batch.crops.data_ptr():
                        moved = dataclasses.replace(moved, crops=batch.crops.clone())
                    item.release()
                yield moved
            return
        stream = torch.cuda.Stream(self.device)
        source = iter(self.batches)
        in_flight: deque[tuple[Batch, torch.cuda.Event]] = deque()
        leases: deque[tuple[Callable[[], None], torch.cuda.Event]] = deque()

        def launch() -> None:
            # Free ring slots whose copies are done before blocking on the next batch (a worker
            # may be waiting for one). The side stream holds only copies, so this wait is short.
            while leases:
                release, copied = leases.popleft()
                copied.synchronize()
                release()
            item = next(source, None)
            if item is None:
                return
            batch = item.batch if isinstance(item, _Leased) else item
            with torch.cuda.stream(stream):
                moved = batch.to(self.device, non_blocking=True)
                done = torch.cuda.Event()
                done.record(stream)
            in_flight.append((moved, done))
            if isinstance(item, _Leased):
                leases.append((item.release, done))

        try:
            for _ in range(self.depth):
                launch()
            while in_flight:
                batch, done = in_flight.popleft()
                compute = torch.cuda.current_stream(self.device)
                compute.wait_event(done)
                # The tensors were allocated on the side stream but are used on the compute stream.
                batch.crops.record_stream(compute)
                batch.labels.record_stream(compute)
                if batch.boxes is not None:
                    batch.boxes.record_stream(compute)
                launch()
                yield batch
        finally:
            for release, copied in leases:
                copied.synchronize()
                release()


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
        levels: frozenset[str] | None = None,
        cache: str = "none",
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
        # `--levels`: only the samples of these vertebra levels (their JSON's `level`).
        indexes, self.dropped_levels = select_levels(indexes, levels)
        if backend == "dali" and self.dropped_levels:
            raise ShardError(
                shard_label(self.shards),
                f"the level filter leaves out {self.dropped_levels} samples, but the DALI "
                "reader reads whole shards; use --loader torch, or --levels all",
            )
        if not indexes:
            reasons = []
            if self.skipped:
                reasons.append(
                    f"{len(self.skipped)} skipped as unreadable, first: {self.skipped[0]}"
                )
            if self.dropped_levels:
                reasons.append(f"{self.dropped_levels} left out by the level filter")
            why = f" ({'; '.join(reasons)})" if reasons else ""
            raise ShardError(shard_label(self.shards), f"no usable samples{why}")
        self.indexes = indexes
        self.num_samples = sum(len(index) for index in indexes)
        workers = max(1, num_workers)
        if training and self.num_samples < self.world_size * batch_size:
            raise ShardError(
                shard_label(self.shards),
                f"{self.num_samples} samples are too few for one batch of {batch_size} on each "
                f"of {self.world_size} rank(s); lower --batch-size or use fewer processes",
            )
        self._stream = _CropStream(
            indexes=indexes,
            batch_size=batch_size,
            training=training,
            seed=seed,
            rank=self.rank,
            world_size=self.world_size,
            workers=workers,
            shuffle_buffer=shuffle_buffer,
            pin=self.device.type == "cuda" and num_workers == 0,
        )
        # Every epoch's plan has the same number of batches.
        self._length = len(self._stream.plan(self.rank))
        if backend == "dali":
            from vctmae.data.dali import _require_dali, dali_length

            _require_dali()  # a clear one-line error now, not at the first iteration
            self._length = dali_length(
                self.num_samples,
                rank=self.rank,
                world_size=self.world_size,
                batch_size=batch_size,
                training=training,
            )
        self._workers: DataLoader | None = None
        self._served = 0  # batches of the current epoch handed out (for state_dict)
        self._resume = False
        self._cache = None
        if cache == "device":
            if backend == "dali":
                raise ShardError(
                    shard_label(self.shards),
                    "--cache device replaces the loader: use --loader torch",
                )
            from vctmae.data.cache import DeviceCache

            stream = self._stream
            self._cache = DeviceCache(
                keys=stream.keys,
                labels=stream.labels,
                boxes=stream.boxes,
                shape=stream.shape,
                read_into=stream.read_into,
                device=self.device,
                where=shard_label(self.shards),
            )
        elif cache not in CACHES:
            raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")

    def close(self) -> None:
        """Stop the worker processes and free the batch ring (garbage collection does it too)."""
        self._workers = None  # the DataLoader's iterator shuts its workers down when collected
        self._stream.ring = None

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for `epoch` (training); call before iterating, on every rank."""
        self.epoch = epoch
        self._stream.epoch = epoch

    def __len__(self) -> int:
        return self._length

    def state_dict(self) -> dict[str, int]:
        """Where this rank is: the epoch and how many of its batches were handed out."""
        return {"epoch": self.epoch, "batches": self._served, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume: the next iteration continues `state`'s epoch after its handed-out batches."""
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"state is for seed {state['seed']}, this loader has seed {self.seed}")
        self.set_epoch(int(state["epoch"]))
        batches = int(state["batches"])
        if batches and self.backend == "dali":
            raise NotImplementedError("resuming mid-epoch is not supported by the DALI backend")
        self._served = min(batches, self._length)
        self._stream.start.fill_(self._served)
        self._resume = True

    def _host_batches(self) -> Iterable[Batch]:
        if self.backend == "dali":
            from vctmae.data.dali import dali_batches

            return dali_batches(
                self.indexes,
                batch_size=self.batch_size,
                training=self.training,
                seed=self.seed,
                epoch=self.epoch,
                rank=self.rank,
                world_size=self.world_size,
                threads=max(1, self.num_workers),
                prefetch=self.prefetch,
                shuffle_buffer=self._stream.shuffle_buffer,
                device=self.device,
                batches=self._length,
            )
        if self.num_workers == 0:
            return iter(self._stream)
        if self._workers is None:  # persistent: worker start-up is paid once, not every epoch
            self._stream.ring = _BatchRing(
                self.num_workers, _PREFETCH_FACTOR + 2, self.batch_size, self._stream.shape
            )
            if self.device.type == "cuda":
                self._stream.ring.pin()
            self._workers = DataLoader(
                self._stream,
                batch_size=None,
                num_workers=self.num_workers,
                prefetch_factor=_PREFETCH_FACTOR,
                persistent_workers=True,
                # Its own generator: creating the iterator draws the workers' base seed, which
                # must not advance torch's global RNG (dropout) — see the module docstring.
                generator=torch.Generator().manual_seed(self.seed),
            )
        ring = self._stream.ring
        ring.release_all()  # slots held by an abandoned epoch's batches
        return self._leased(ring, self._workers)

    @staticmethod
    def _leased(ring: _BatchRing, workers: DataLoader) -> Iterator[_Leased]:
        for item in workers:
            crops = ring.view(item.worker, item.slot, len(item.keys))
            yield _Leased(
                Batch(
                    crops, torch.from_numpy(item.labels), item.keys, torch.from_numpy(item.boxes)
                ),
                functools.partial(ring.release, item.worker, item.slot),
            )

    def __iter__(self) -> Iterator[Batch]:
        if self._resume:  # the start set by load_state_dict applies to this one iteration
            self._resume = False
        else:
            self._stream.start.zero_()
            self._served = 0
        if self._cache is not None:
            plan = self._stream.plan(self.rank)[int(self._stream.start) :]
            batches: Iterable[Batch] = self._cache.batches(plan)
        else:
            batches = DevicePrefetcher(self._host_batches(), self.device, depth=self.prefetch)
        for batch in batches:
            self._served += 1
            yield batch
