"""Shards of given crops, written by ingest's own `ShardWriter`: for benchmarks and tests.

Benchmarks and tests need shards of crops they make up (random volumes, easy
boxes, odd labels); writing them through `vctmae.ingest.writers.ShardWriter`
keeps them in exactly ingest's format (member names, `.npy` bytes, headers), so
no second shard writer exists anywhere.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from vctmae.clip import CLASS_MEMBER, CROP_MEMBER, META_MEMBER
from vctmae.ingest.writers import ShardWriter, npy_bytes

# A sample: (key, int16 crop, class or None for an unlabelled one).
Sample = tuple[str, np.ndarray, int | None]
_NO_LIMIT = 1 << 62


def sample_members(key: str, crop: np.ndarray, label: int | None) -> list[tuple[str, bytes]]:
    """`KEY.crop.npy`, `KEY.json` (key and level — the key's last `_` part, as ingest names
    keys) and, for a labelled sample, `KEY.cls`."""
    meta = {"key": key, "level": key.rsplit("_", 1)[-1]}
    members = [(CROP_MEMBER, npy_bytes(crop)), (META_MEMBER, json.dumps(meta).encode())]
    if label is not None:
        members.append((CLASS_MEMBER, str(int(label)).encode()))
    return members


def write_shards(folder: Path, split: str, shards: Iterable[Iterable[Sample]]) -> list[Path]:
    """`{split}-000000.tar`, `-000001.tar`, … under `folder`, one per group of samples."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(folder, split, _NO_LIMIT)
    for samples in shards:
        for key, crop, label in samples:
            writer.write(key, sample_members(key, crop, label))
        # Closing ends this shard: the next sample opens the next one.
        writer.close()
    return [folder / name for name in writer.names]
