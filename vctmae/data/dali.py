"""DALI backend (optional `[dali]` extra): DALI's webdataset reader + numpy decoder, same Batch out.

`dali_batches(loader)` serves a ShardLoader with `backend="dali"`: the reader
splits samples across ranks (`shard_id=rank`, `num_shards=world_size`,
`stick_to_shard` so evaluation sees each sample exactly once across ranks),
decodes the `.npy` crops to int16 (CPU operator), and on a GPU moves them to the
device inside the graph. The pipeline is rebuilt per epoch so the shuffle is
reseeded from (seed, epoch). DALI does its own threading, so `num_workers` is
its thread count.

`frames_pipeline` is the same reader followed by the frame gather and HU scaling
in the DALI graph (on the GPU when there is one) — identical to
`sample_frames(crops, offsets)`, or, given per-sample frame indices (B × 16, any
rule of `vctmae.clip`, e.g. mask mode's), to gathering those slices. Two traps of
DALI 2.4.0 shape it: strided slicing (`vol[o::6]`) silently returns consecutive
rows for samples larger than ~100k elements, so each frame is taken by its own
per-sample index (`vol[index_k]`); and `fn.random.uniform(range=[0, 6],
dtype=INT32)` can return 6, so offsets are drawn with `values=`.

Batches carry each sample's mask box (`Batch.boxes`) looked up by key in the
loader's shard index, as the torch backend's do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from vctmae.clip import HU_MAX, HU_MIN, NUM_FRAMES, STRIDE
from vctmae.data.loader import Batch
from vctmae.data.shards import CLASS_EXT, CROP_EXT, split_member_name
from vctmae.errors import VctmaeError

if TYPE_CHECKING:
    from vctmae.data.loader import ShardLoader

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


def _reader(
    fn,
    shards: Sequence[str],
    *,
    training: bool,
    seed: int,
    rank: int,
    world_size: int,
    shuffle_buffer: int,
):
    crop, label = fn.readers.webdataset(
        paths=list(shards),
        ext=[CROP_EXT, CLASS_EXT],
        missing_component_behavior="empty",
        name="reader",
        shard_id=rank,
        num_shards=world_size,
        stick_to_shard=True,
        pad_last_batch=not training,
        random_shuffle=training,
        initial_fill=max(1, shuffle_buffer),
        seed=seed,
    )
    info = fn.pad(
        fn.get_property(crop, key="source_info"), axes=[0], shape=[_INFO_BYTES], fill_value=0
    )
    label = fn.pad(label, axes=[0], shape=[_CLASS_BYTES], fill_value=0)
    return fn.decoders.numpy(crop), label, info


def _device_id(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.default_rng([seed, epoch]).integers(1 << 31))


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


def dali_batches(loader: ShardLoader) -> Iterator[Batch]:
    """Batches for `loader` (a ShardLoader with backend='dali'), as the torch backend yields them."""
    dali = _require_dali()
    from nvidia.dali import fn
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    device_id = _device_id(loader.device)

    @dali.pipeline_def(
        batch_size=loader.batch_size,
        num_threads=max(1, loader.num_workers),
        device_id=device_id,
        prefetch_queue_depth=max(2, loader.prefetch),
    )
    def pipeline():
        crops, label, info = _reader(
            fn,
            [index.path for index in loader.indexes],
            training=loader.training,
            seed=_epoch_seed(loader.seed, loader.epoch),
            rank=loader.rank,
            world_size=loader.world_size,
            shuffle_buffer=loader._stream.shuffle_buffer,
        )
        return (crops.gpu() if device_id is not None else crops), label, info

    pipe = pipeline()
    pipe.build()
    policy = LastBatchPolicy.DROP if loader.training else LastBatchPolicy.PARTIAL
    iterator = DALIGenericIterator(
        pipe,
        ["crops", "label", "info"],
        reader_name="reader",
        last_batch_policy=policy,
        auto_reset=False,
    )
    limit = dali_length(loader)
    boxes_by_key = {
        key: box
        for index in loader.indexes
        for key, box in zip(index.keys, index.boxes, strict=True)
    }
    served = 0
    for outputs in iterator:
        data = outputs[0]
        if served == limit:
            break
        if len(data["crops"]) == 0:
            continue
        keys, labels = _keys_and_labels(data["info"], data["label"])
        boxes = torch.from_numpy(np.stack([boxes_by_key[key] for key in keys]))
        yield Batch(data["crops"], labels, keys, boxes)
        served += 1


def dali_length(loader: ShardLoader) -> int:
    """Batches per epoch on this rank: DALI splits samples contiguously by rank, not by worker."""
    total, ranks, rank, batch = (
        loader.num_samples,
        loader.world_size,
        loader.rank,
        loader.batch_size,
    )
    if loader.training:
        return total // ranks // batch  # the smallest rank's count, so all ranks agree (drop_last)
    mine = (rank + 1) * total // ranks - rank * total // ranks
    return -(-mine // batch)


def frames_pipeline(
    shards: Sequence[str],
    *,
    batch_size: int,
    training: bool = False,
    seed: int = 0,
    num_threads: int = 2,
    device_id: int | None = None,
    offset: int | None = None,
    frame_indices: Callable[[], Sequence[np.ndarray]] | None = None,
    rank: int = 0,
    world_size: int = 1,
    shuffle_buffer: int = 256,
):
    """A built DALI pipeline: outputs (crops int16, offsets int32 — or the frame indices —,
    frames float32 (1, 16, H, W), label, info).

    Frames are gathered per sample at its own 16 slice indices:
    - `frame_indices` given: a callable returning, per iteration, one int (16,) array per sample
      of the batch (e.g. from `vctmae.clip.frame_index_tensor`); the second output is those
      indices;
    - else the paper's rule o + 6k, with `offset` fixing every sample's offset (evaluation
      views) or None drawing one of 0..5 per sample; the second output is the offsets.
    """
    dali = _require_dali()
    from nvidia.dali import fn, types

    @dali.pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id)
    def pipeline():
        crops, label, info = _reader(
            fn,
            shards,
            training=training,
            seed=seed,
            rank=rank,
            world_size=world_size,
            shuffle_buffer=shuffle_buffer,
        )
        if frame_indices is not None:
            chosen = fn.external_source(source=frame_indices, batch=True, dtype=types.INT32)
            per_frame = [chosen[k] for k in range(NUM_FRAMES)]
        else:
            if offset is None:
                chosen = fn.random.uniform(
                    values=list(range(STRIDE)), dtype=types.INT32, seed=seed + 1
                )
            else:
                chosen = fn.constant(idata=[int(offset)], shape=[], dtype=types.INT32)
            per_frame = [chosen + STRIDE * k for k in range(NUM_FRAMES)]
        volume = fn.reshape(crops.gpu() if device_id is not None else crops, layout="FHW")
        # One per-sample index per frame (never a strided slice: see the module docstring).
        frames = fn.stack(*[volume[index] for index in per_frame])  # (16, H, W)
        frames = fn.cast(frames, dtype=types.FLOAT)
        frames = (dali.math.clamp(frames, HU_MIN, HU_MAX) - HU_MIN) / (HU_MAX - HU_MIN)
        frames = fn.expand_dims(frames, axes=[0])  # (1, 16, H, W)
        return crops, chosen, frames, label, info

    pipe = pipeline()
    pipe.build()
    return pipe
