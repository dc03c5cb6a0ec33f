"""DALI backend: identical tensors to the torch backend (skipped cleanly without the [dali] extra)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")


from helpers import make_shards, rank_loaders

from vctmae.data.loader import ShardLoader


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("dali-shards")
    truth = make_shards(
        root, [3, 1, 4], shape=(96, 96, 96), seed=int(np.random.default_rng().integers(1 << 30))
    )
    return str(root / "train-*.tar"), truth


def test_dali_loader_equals_torch_loader(shards):
    pattern, truth = shards
    seen = []
    for rank in range(2):
        by_backend = {}
        for backend in ("torch", "dali"):
            loader = ShardLoader(
                pattern,
                batch_size=3,
                training=False,
                num_workers=1,
                device="cpu",
                backend=backend,
                rank=rank,
                world_size=2,
            )
            batches = list(loader)
            assert len(batches) == len(loader)
            by_backend[backend] = {
                key: (crop, int(label))
                for b in batches
                for key, crop, label in zip(b.keys, b.crops, b.labels, strict=True)
            }
        assert by_backend["dali"].keys() <= truth.keys()
        for key, (crop, label) in by_backend["dali"].items():
            assert crop.dtype == torch.int16 and torch.equal(crop, torch.from_numpy(truth[key][0]))
            assert label == truth[key][1]
        seen.extend(by_backend["dali"])
    assert Counter(seen) == Counter(truth.keys())  # eval: every sample exactly once across ranks


def test_dali_training_ranks_agree_on_batch_count(shards):
    pattern, truth = shards
    counts, keys = [], []
    dali = rank_loaders(pattern, batch_size=2, training=True, num_workers=1, backend="dali", seed=5)
    for loader in dali:
        batches = list(loader)
        counts.append(len(batches))
        assert len(batches) == len(loader) == 2 and all(len(b) == 2 for b in batches)
        keys.extend(k for b in batches for k in b.keys)
    assert len(set(keys)) == len(keys) and set(keys) <= truth.keys()


def test_dali_keys_keep_member_folders(tmp_path):
    """DALI names samples as the torch backend does: whole member paths, never basenames."""
    from helpers import write_shard

    rng = np.random.default_rng()
    crops = rng.integers(-2000, 3000, size=(4, 96, 96, 96), dtype=np.int16)
    keys = ["a/x_L1", "b/x_L1", "x_L1", "v1.2/x_L1"]
    write_shard(
        tmp_path / "nested-000000.tar", list(zip(keys, crops, [0, 1, None, 1], strict=True))
    )
    by_backend = {}
    for backend in ("torch", "dali"):
        loader = ShardLoader(
            str(tmp_path / "nested-000000.tar"), batch_size=2, training=False, num_workers=1,
            device="cpu", backend=backend,
        )  # fmt: skip
        by_backend[backend] = {
            key: (crop, int(label))
            for batch in loader
            for key, crop, label in zip(batch.keys, batch.crops, batch.labels, strict=True)
        }
    assert sorted(by_backend["dali"]) == sorted(keys)
    for key, (crop, label) in by_backend["dali"].items():
        assert (
            torch.equal(crop, by_backend["torch"][key][0]) and label == by_backend["torch"][key][1]
        )
