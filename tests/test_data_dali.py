"""DALI backend: identical tensors to the torch backend (skipped cleanly without the [dali] extra)."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ may or may not be a package
from test_data import make_shards  # noqa: E402

from vctmae.data import ShardLoader, sample_frames  # noqa: E402
from vctmae.data.dali import frames_pipeline  # noqa: E402


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
    for rank in range(2):
        loader = ShardLoader(
            pattern,
            batch_size=2,
            training=True,
            num_workers=1,
            device="cpu",
            backend="dali",
            rank=rank,
            world_size=2,
            seed=5,
        )
        batches = list(loader)
        counts.append(len(batches))
        assert len(batches) == len(loader) == 2 and all(len(b) == 2 for b in batches)
        keys.extend(k for b in batches for k in b.keys)
    assert len(set(keys)) == len(keys) and set(keys) <= truth.keys()


@pytest.mark.parametrize("offset", [None, 0, 5])
def test_dali_frames_equal_sample_frames(shards, offset):
    pattern, truth = shards
    import glob

    pipe = frames_pipeline(sorted(glob.glob(pattern)), batch_size=4, offset=offset, seed=7)
    drawn = []
    for _ in range(3):
        crops, offsets, frames, _, _ = (out.as_array() for out in pipe.run())
        offsets = torch.from_numpy(offsets).long()
        drawn.extend(offsets.tolist())
        expected = sample_frames(torch.from_numpy(crops), offsets)
        torch.testing.assert_close(torch.from_numpy(frames), expected, rtol=0, atol=0)
    assert set(drawn) <= set(range(6))
    if offset is not None:
        assert set(drawn) == {offset}


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


def test_dali_frames_at_per_sample_indices(shards):
    """Any per-sample frame indices (here mask mode's over random extents, and random sorted
    slices) gather in the DALI graph exactly what indexing the crops gives."""
    import glob

    from vctmae import clip

    pattern, _ = shards
    rng = np.random.default_rng()
    batches = []
    for _ in range(3):
        widths = rng.integers(14, 97, size=4)
        lows = [int(rng.integers(0, 97 - w)) for w in widths]
        extents = torch.tensor([(lo, lo + int(w) - 1) for lo, w in zip(lows, widths, strict=True)])
        mask = clip.frame_index_tensor("mask", torch.from_numpy(rng.integers(-2, 2, 4)), extents)
        batches.append([row.numpy().astype(np.int32) for row in mask])
    batches.append([np.sort(rng.choice(96, 16, replace=False)).astype(np.int32) for _ in range(4)])
    feed = iter(batches)
    pipe = frames_pipeline(
        sorted(glob.glob(pattern)), batch_size=4, frame_indices=lambda: next(feed)
    )
    for expected_indices in batches:
        crops, indices, frames, _, _ = (out.as_array() for out in pipe.run())
        assert np.array_equal(indices, np.stack(expected_indices))
        rows = torch.arange(4)[:, None]
        expected = clip.scale_hu(torch.from_numpy(crops)[rows, torch.from_numpy(indices).long()])
        torch.testing.assert_close(torch.from_numpy(frames)[:, 0], expected, rtol=0, atol=0)
