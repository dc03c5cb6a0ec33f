"""DALI backend (optional `[dali]` extra): DALI's webdataset reader + numpy decoder, same Batch out.

`dali_batches` serves a ShardLoader with `backend="dali"`: the reader
splits samples across ranks (`shard_id=rank`, `num_shards=world_size`,
`stick_to_shard` so evaluation sees each sample exactly once across ranks),
decodes the `.npy` crops to int16 (CPU operator), and on a GPU moves them to the
device inside the graph. The pipeline is rebuilt per epoch so the shuffle is
reseeded from (seed, epoch). DALI does its own threading, so the loader's worker
count is its thread count. Frames are made from the crops afterwards, as for the torch
backend.

Batches carry each sample's mask box (`Batch.boxes`) looked up by key in the
loader's shard index, as the torch backend's do.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from vctmae.clip import CLASS_MEMBER, CROP_MEMBER
from vctmae.data.batch import Batch
from vctmae.data.shards import ShardIndex, split_member_name
from vctmae.errors import VctmaeError

# source_info ("<tar>:<offset>:<member>") padded to a fixed width so batches are dense
_INFO_BYTES = 512
_CLASS_BYTES = 8


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


class DaliMissingError(VctmaeError, ImportError):
    """`--loader dali` without NVIDIA DALI installed."""


def _require_dali():
    try:
        import nvidia.dali as dali
    except ImportError:
        raise DaliMissingError(
            "--loader dali needs NVIDIA DALI, which is not installed: "
            "pip install 'vctmae[dali]' (or use --loader torch)"
        ) from None
    return dali


def _keys_and_labels(info: torch.Tensor, label: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    keys = []
    for row in info.cpu().numpy():
        member = bytes(row).rstrip(b"\0").decode("utf-8").rsplit(":", 1)[-1]
        keys.append(split_member_name(member)[0])
    labels = []
    for row in label.cpu().numpy():
        text = bytes(row).rstrip(b"\0").decode("ascii").strip()
        labels.append(int(text) if text else -1)
    return keys, torch.tensor(labels, dtype=torch.int64)


def dali_batches(
    indexes: Sequence[ShardIndex],
    *,
    batch_size: int,
    training: bool,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    threads: int,
    prefetch: int,
    shuffle_buffer: int,
    device: torch.device,
    batches: int,
) -> Iterator[Batch]:
    """This rank's `batches` batches of one epoch over the shards of `indexes`, on `device`, as
    the torch backend yields them (`dali_length` gives their number)."""
    dali = _require_dali()
    from nvidia.dali import fn
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    device_id = None
    if device.type == "cuda":
        device_id = device.index if device.index is not None else torch.cuda.current_device()

    @dali.pipeline_def(
        batch_size=batch_size,
        num_threads=threads,
        device_id=device_id,
        prefetch_queue_depth=max(2, prefetch),
    )
    def pipeline():
        crop, label = fn.readers.webdataset(
            paths=[index.path for index in indexes],
            ext=[CROP_MEMBER, CLASS_MEMBER],
            missing_component_behavior="empty",
            name="reader",
            shard_id=rank,
            num_shards=world_size,
            stick_to_shard=True,
            pad_last_batch=not training,
            random_shuffle=training,
            initial_fill=max(1, shuffle_buffer),
            # Reseeded every epoch from (seed, epoch).
            seed=int(np.random.default_rng([seed, epoch]).integers(1 << 31)),
        )
        info = fn.pad(
            fn.get_property(crop, key="source_info"), axes=[0], shape=[_INFO_BYTES], fill_value=0
        )
        label = fn.pad(label, axes=[0], shape=[_CLASS_BYTES], fill_value=0)
        crops = fn.decoders.numpy(crop)
        return (crops.gpu() if device_id is not None else crops), label, info

    pipe = pipeline()
    pipe.build()
    policy = LastBatchPolicy.DROP if training else LastBatchPolicy.PARTIAL
    iterator = DALIGenericIterator(
        pipe,
        ["crops", "label", "info"],
        reader_name="reader",
        last_batch_policy=policy,
        auto_reset=False,
    )
    boxes_by_key = {
        key: box for index in indexes for key, box in zip(index.keys, index.boxes, strict=True)
    }
    served = 0
    for outputs in iterator:
        data = outputs[0]
        if served == batches:
            break
        if len(data["crops"]) == 0:
            continue
        keys, labels = _keys_and_labels(data["info"], data["label"])
        boxes = torch.from_numpy(np.stack([boxes_by_key[key] for key in keys]))
        yield Batch(data["crops"], labels, keys, boxes)
        served += 1


def dali_length(
    num_samples: int, *, rank: int, world_size: int, batch_size: int, training: bool
) -> int:
    """Batches per epoch on this rank: DALI splits samples contiguously by rank, not by worker."""
    if training:
        # The smallest rank's count, so all ranks agree (drop_last).
        return num_samples // world_size // batch_size
    mine = (rank + 1) * num_samples // world_size - rank * num_samples // world_size
    return -(-mine // batch_size)
