"""`--cache device`: every crop resident in device memory, batches gathered by index there.

The paper's pretraining set is 27,776 int16 96³ crops = 49 GB: it fits in an
H200's 139 GiB with room for ViT-L. Loaded once (shard by shard through a small
pinned buffer, so host memory stays flat), each batch is then one gather on the
device — no reading, no worker processes, no host→device copy per step. The
batches are exactly the streaming loader's: the loader hands the cache its epoch plan, so
the order and the resume position are the same.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from vctmae.data.batch import Batch
from vctmae.errors import VctmaeError

# Share of the free device memory the crops may take: the model, its activations and the
# optimizer state need the rest.
MAX_SHARE = 0.75
_CHUNK = 64  # crops per host→device copy while loading


class CacheError(VctmaeError):
    """The crops do not fit the device memory."""


def free_bytes(device: torch.device) -> int:
    """Free memory of `device` now (host RAM for the CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class DeviceCache:
    """All crops of a loader's shards in one (N, *shape) int16 tensor on `device`.

    keys, labels (N,) and boxes (N, 6) describe the N samples in the loader's numbering;
    `read_into(ids, out, files)` reads the crops of samples `ids` into the int16 array `out`,
    opening shards into `files` (shard number → file descriptor), which the cache closes.
    """

    def __init__(
        self,
        *,
        keys: list[str],
        labels: np.ndarray,
        boxes: np.ndarray,
        shape: tuple[int, ...],
        read_into: Callable[[np.ndarray, np.ndarray, dict[int, int]], None],
        device: torch.device,
        where: str,
    ) -> None:
        count = len(keys)
        need = count * int(np.prod(shape)) * 2
        free = free_bytes(device)
        if need > MAX_SHARE * free:
            raise CacheError(
                f"{where}: --cache device needs {need / 2**30:.1f} GiB for {count} crops, more "
                f"than {MAX_SHARE:.0%} of the {free / 2**30:.1f} GiB free on {device}; "
                "use the streaming loader (--cache none) or fewer shards"
            )
        self.device = device
        self.keys = keys
        self.crops = torch.empty((count, *shape), dtype=torch.int16, device=device)
        self.labels = torch.from_numpy(labels.astype(np.int64)).to(device)
        # Each sample's JSON mask box (`Batch.boxes`, what `--frames mask` needs).
        self.boxes = torch.from_numpy(boxes.astype(np.int64)).to(device)
        buffer = torch.empty((_CHUNK, *shape), dtype=torch.int16, pin_memory=device.type == "cuda")
        files: dict[int, int] = {}
        try:
            for start in range(0, count, _CHUNK):
                ids = np.arange(start, min(start + _CHUNK, count))
                read_into(ids, buffer.numpy(), files)
                # Synchronous on purpose: the pinned buffer is refilled right after.
                self.crops[start : start + len(ids)].copy_(buffer[: len(ids)])
        finally:
            for fd in files.values():
                os.close(fd)

    def batches(self, plan: Iterable[np.ndarray]) -> Iterator[Batch]:
        """A batch per entry of `plan` (the sample ids of each batch, in order), gathered on the
        device."""
        for ids in plan:
            index = torch.from_numpy(ids).to(self.device, non_blocking=True)
            keys = [self.keys[i] for i in ids]
            yield Batch(self.crops[index], self.labels[index], keys, self.boxes[index])
