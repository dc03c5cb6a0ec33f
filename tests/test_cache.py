"""`--cache device` (vctmae.data.cache): crops resident in device memory, the same batches.

On the CPU the "device" is host memory: the cache must give exactly the streaming
loader's batches (keys, crops, labels, order) for the same seed and epoch, and
resume mid-epoch where the streaming loader would.
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_shards

from vctmae.data.cache import CacheError
from vctmae.data.loader import ShardLoader
from vctmae.data.options import LoaderOptions
from vctmae.errors import UsageError


def epoch(loader: ShardLoader, epoch: int, limit: int | None = None) -> list:
    loader.set_epoch(epoch)
    out = []
    for batch in loader:
        out.append((list(batch.keys), batch.crops.clone(), batch.labels.clone()))
        if limit is not None and len(out) == limit:
            break
    return out


def assert_same(a: list, b: list) -> None:
    assert [keys for keys, _, _ in a] == [keys for keys, _, _ in b]
    for (_, crops_a, labels_a), (_, crops_b, labels_b) in zip(a, b, strict=True):
        assert torch.equal(crops_a, crops_b) and torch.equal(labels_a, labels_b)


@pytest.mark.parametrize("training", [True, False])
def test_device_cache_gives_the_streaming_batches(tmp_path, training):
    make_shards(tmp_path, [7, 5, 9], seed=4)
    shards = sorted(str(p) for p in tmp_path.glob("*.tar"))
    kwargs = dict(batch_size=4, training=training, seed=2, device="cpu", rank=0, world_size=1)
    streaming = ShardLoader(shards, num_workers=0, **kwargs)
    cached = ShardLoader(shards, num_workers=0, cache="device", **kwargs)
    for number in (0, 1):
        assert_same(epoch(cached, number), epoch(streaming, number))


def test_device_cache_resumes_mid_epoch(tmp_path):
    make_shards(tmp_path, [10, 10], seed=5)
    shards = sorted(str(p) for p in tmp_path.glob("*.tar"))
    kwargs = dict(batch_size=3, training=True, seed=7, device="cpu", rank=0, world_size=1)
    full = epoch(ShardLoader(shards, num_workers=0, cache="device", **kwargs), 1)
    first = ShardLoader(shards, num_workers=0, cache="device", **kwargs)
    done = epoch(first, 1, limit=2)
    state = first.state_dict()
    resumed = ShardLoader(shards, num_workers=0, cache="device", **kwargs)
    resumed.load_state_dict(state)
    rest = [(list(b.keys), b.crops.clone(), b.labels.clone()) for b in resumed]
    assert_same(done + rest, full)


def test_device_cache_refuses_crops_that_do_not_fit(tmp_path, monkeypatch):
    make_shards(tmp_path, [6], seed=6)
    shards = [str(p) for p in tmp_path.glob("*.tar")]
    monkeypatch.setattr("vctmae.data.cache.free_bytes", lambda device: 1000)
    with pytest.raises(CacheError, match=r"needs .* GiB for 6 crops.*free on cpu"):
        ShardLoader(shards, batch_size=2, training=False, device="cpu", cache="device")
    with pytest.raises(UsageError, match="--cache"):
        LoaderOptions(cache="gpu")
    with pytest.raises(UsageError, match="--loader torch"):
        LoaderOptions(cache="device", backend="dali")
