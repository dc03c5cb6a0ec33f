"""vctmae.data: frame sampling, shard lists, rank/worker split, corrupt shards, Zarr access."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SMALL_CROP, count_samples, make_shards, rank_loaders, write_shard

from vctmae import clip
from vctmae.data.frames import mirror, random_offsets, sample_frames
from vctmae.data.loader import ShardLoader
from vctmae.data.shards import ShardError, expand_shards
from vctmae.data.zarr_store import ZarrCrops


def collect(loader: ShardLoader) -> tuple[list[str], list[int]]:
    """All keys of one epoch on this rank, and the size of every batch."""
    keys, sizes = [], []
    for batch in loader:
        assert batch.crops.dtype == torch.int16 and batch.labels.dtype == torch.int64
        keys.extend(batch.keys)
        sizes.append(len(batch))
    return keys, sizes


# ----------------------------------------------------------------------------- frames


def numpy_frames(crops: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Independent reference: per-sample loop over the sagittal slices o, o+6, …, o+90."""
    out = np.empty((len(crops), 1, 16, crops.shape[2], crops.shape[3]), dtype=np.float32)
    for b, (crop, offset) in enumerate(zip(crops, offsets, strict=True)):
        for k in range(16):
            hu = np.minimum(np.maximum(crop[offset + 6 * k].astype(np.float32), -1000), 1000)
            out[b, 0, k] = (hu + 1000) / 2000
    return out


def test_sample_frames_matches_numpy_reference():
    rng = np.random.default_rng()
    crops = rng.integers(-32768, 32767, size=(5, 96, 48, 40), dtype=np.int16)
    crops[0, :, :2, :2] = [[-1001, -1000], [1000, 1001]]  # exact clip boundaries
    offsets = np.array([0, 5, *rng.integers(0, 6, size=3)])
    got = sample_frames(torch.from_numpy(crops), torch.from_numpy(offsets))
    assert got.shape == (5, 1, 16, 48, 40) and got.dtype == torch.float32
    torch.testing.assert_close(
        got, torch.from_numpy(numpy_frames(crops, offsets)), rtol=1e-6, atol=1e-7
    )
    assert got.min() >= 0 and got.max() <= 1
    assert got[0, 0, :, 0, 0].eq(0).all() and got[0, 0, :, 1, 1].eq(1).all()


def test_crop_mode_views_cover_every_slice_once():
    crop = (
        torch.arange(96, dtype=torch.int16).view(96, 1, 1).expand(96, 2, 2) * 10 - 480
    )  # slice i = 10i − 480 HU
    views = clip.view_shifts("crop")
    frames = sample_frames(crop.expand(len(views), -1, -1, -1), torch.tensor(views))
    slices = (
        torch.round(frames[:, 0, :, 0, 0] * 2000 - 1000 + 480).long() // 10
    )  # back to slice index
    assert sorted(slices.flatten().tolist()) == list(range(96))
    assert clip.middle_shift("crop") == 3


def test_training_offsets_cover_0_to_5_and_mirror_reverses_the_sagittal_axis():
    generator = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 30)))
    offsets = random_offsets(6000, generator=generator)
    assert offsets.dtype == torch.int64 and set(offsets.tolist()) == set(range(6))
    crops = torch.from_numpy(
        np.random.default_rng().integers(-1000, 1000, size=(3, 96, 8, 8), dtype=np.int16)
    )
    flags = torch.tensor([True, False, True])
    out = mirror(crops, flags)
    assert torch.equal(out[0], crops[0].flip(0)) and torch.equal(out[1], crops[1])
    assert torch.equal(out[2, 0], crops[2, 95])


# ----------------------------------------------------------------------------- shard lists and errors


def test_glob_forms_select_the_same_shards(tmp_path):
    make_shards(tmp_path, [1, 2, 1, 1])
    make_shards(tmp_path, [1], prefix="val")
    shell = sorted(
        str(p) for p in tmp_path.glob("train-*.tar")
    )  # what an unquoted shell glob passes
    assert len(shell) == 4
    assert expand_shards(shell) == shell
    assert expand_shards(str(tmp_path / "train-*.tar")) == shell
    assert expand_shards(str(tmp_path / "train-{000000..000003}.tar")) == shell
    assert (
        expand_shards([str(tmp_path / "train-{000000..000001}.tar"), shell[2], shell[3]]) == shell
    )
    assert count_samples(str(tmp_path / "train-*.tar")) == 5
    with pytest.raises(ShardError, match="nothing-"):
        expand_shards(str(tmp_path / "nothing-*.tar"))


def test_missing_and_corrupt_shards_are_named_or_skipped(tmp_path):
    truth = make_shards(tmp_path, [3, 2, 4])
    shards = sorted(str(p) for p in tmp_path.glob("train-*.tar"))
    with tarfile.open(shards[1]) as tar:
        cut = [m for m in tar.getmembers() if m.name.endswith(".crop.npy")][-1].offset_data + 200
    Path(shards[1]).write_bytes(
        Path(shards[1]).read_bytes()[:cut]
    )  # truncated inside the last crop
    garbage = tmp_path / "train-000003.tar"
    garbage.write_bytes(np.random.default_rng().bytes(5000))
    missing = str(tmp_path / "train-000009.tar")
    for bad in (shards[1], str(garbage), missing):
        with pytest.raises(ShardError) as raised:
            ShardLoader([shards[0], bad], batch_size=2, training=False, num_workers=0, device="cpu")
        assert bad in str(raised.value)
    loader = ShardLoader(
        [*shards, str(garbage), missing],
        batch_size=2,
        training=False,
        num_workers=0,
        device="cpu",
        skip_corrupt=True,
    )
    assert len(loader.skipped) == 3
    assert all(
        any(path in line for line in loader.skipped) for path in (shards[1], str(garbage), missing)
    )
    keys, _ = collect(loader)
    assert sorted(keys) == sorted(k for k in truth if not k.startswith("case01"))


def test_a_loader_with_nothing_to_read_names_its_shards_and_says_why(tmp_path):
    make_shards(tmp_path, [3, 2])
    shards = [str(tmp_path / "train-000000.tar"), str(tmp_path / "train-000001.tar")]
    with pytest.raises(ShardError) as raised:
        ShardLoader(
            shards,
            batch_size=2,
            training=False,
            num_workers=0,
            device="cpu",
            levels=frozenset({"T1"}),
        )
    message = str(raised.value)
    assert message.startswith(f"{shards[0]} (+1 more shards): no usable samples")
    assert "5 left out by the level filter" in message
    garbage = tmp_path / "train-000002.tar"
    garbage.write_bytes(np.random.default_rng().bytes(3000))
    with pytest.raises(ShardError) as raised:
        ShardLoader(
            [str(garbage)],
            batch_size=2,
            training=False,
            num_workers=0,
            device="cpu",
            skip_corrupt=True,
        )
    assert str(raised.value).startswith(f"{garbage}: no usable samples (1 skipped as unreadable")


def test_remote_shards_are_fetched_once_and_read_like_local(tmp_path, monkeypatch):
    truth = make_shards(tmp_path / "remote", [2, 3])
    monkeypatch.setenv("VCTMAE_SHARD_CACHE", str(tmp_path / "cache"))
    urls = [f"pipe:cat {p}" for p in sorted((tmp_path / "remote").glob("*.tar"))]
    loader = ShardLoader(urls, batch_size=2, training=False, num_workers=0, device="cpu")
    for batch in loader:
        for key, crop in zip(batch.keys, batch.crops, strict=True):
            assert np.array_equal(crop.numpy(), truth[key][0])
    assert sorted(k for b in loader for k in b.keys) == sorted(truth)
    assert len(list((tmp_path / "cache").iterdir())) == 2
    bad = f"pipe:cat {tmp_path / 'absent.tar'}"
    with pytest.raises(ShardError, match="absent.tar"):
        ShardLoader([bad], batch_size=2, training=False, num_workers=0, device="cpu")


def test_members_in_folders_are_distinct_samples(tmp_path):
    """Keys are whole member paths (up to the first dot of the last component), never basenames:
    a/x.crop.npy and b/x.crop.npy are two samples, and a folder name with a dot stays a folder."""
    rng = np.random.default_rng()
    crops = rng.integers(-2000, 3000, size=(4, *SMALL_CROP), dtype=np.int16)
    keys = ["a/x_L1", "b/x_L1", "x_L1", "v1.2/x_L1"]
    write_shard(
        tmp_path / "nested-000000.tar", list(zip(keys, crops, [0, 1, None, 1], strict=True))
    )
    loader = ShardLoader(
        str(tmp_path / "nested-000000.tar"), batch_size=3, training=False, num_workers=0,
        device="cpu",
    )  # fmt: skip
    got = {k: c for batch in loader for k, c in zip(batch.keys, batch.crops, strict=True)}
    assert sorted(got) == sorted(keys)
    for key, crop in zip(keys, crops, strict=True):
        assert np.array_equal(got[key].numpy(), crop)
    labels = {k: int(v) for batch in loader for k, v in zip(batch.keys, batch.labels, strict=True)}
    assert labels == {"a/x_L1": 0, "b/x_L1": 1, "x_L1": -1, "v1.2/x_L1": 1}


# ----------------------------------------------------------------------------- rank/worker split


def round_robin(per_worker: list[list[int]]) -> list[int]:
    """DataLoader's hand-over for iterable datasets: one item from each worker in turn, passing
    over workers that have finished (an independent model of what the loader relies on)."""
    queues = [list(items) for items in per_worker]
    out: list[int] = []
    while any(queues):
        for queue in queues:
            if queue:
                out.append(queue.pop(0))
    return out


def test_epoch_plan_properties_on_random_layouts():
    from vctmae.data.loader import epoch_plan, worker_batches

    rng = np.random.default_rng()
    for _ in range(200):
        sizes = rng.integers(0, 40, size=int(rng.integers(1, 12))).tolist()
        world, workers, batch = (
            int(rng.integers(1, 5)),
            int(rng.integers(1, 4)),
            int(rng.integers(1, 9)),
        )
        total = sum(sizes)
        args = dict(world_size=world, batch_size=batch, seed=int(rng.integers(99)))
        evaluation = epoch_plan(sizes, training=False, epoch=0, **args)
        assert len(evaluation) == world
        assert sorted(np.concatenate(evaluation).tolist()) == list(range(total))  # exactly once
        training = epoch_plan(sizes, training=True, epoch=int(rng.integers(9)), **args)
        used = np.concatenate(training)
        assert len(set(used.tolist())) == len(used) and set(used.tolist()) <= set(range(total))
        assert {len(part) for part in training} == {total // (world * batch) * batch}  # equal split
        assert total - len(used) < world * batch  # drop_last drops less than one batch per rank
        # Dealing a rank's batches to its workers: every batch exactly once, handed back in order.
        batches, start = int(rng.integers(0, 30)), int(rng.integers(0, 5))
        dealt = [list(worker_batches(batches, workers=workers, worker=w, start=start))
                 for w in range(workers)]  # fmt: skip
        assert round_robin(dealt) == list(range(start, batches))


@pytest.mark.parametrize("sizes", [[5, 1, 9], [2, 3, 1, 4, 2, 2, 1, 3, 2]])
def test_eval_every_sample_once_across_ranks_and_workers(tmp_path, sizes):
    truth = make_shards(tmp_path, sizes)
    shards = str(tmp_path / "train-*.tar")
    seen: list[str] = []
    for loader in rank_loaders(shards, batch_size=2, training=False, num_workers=2):
        next(iter(loader))  # an abandoned epoch must not disturb the next one
        batches = list(loader)  # batches held past later ones must stay intact
        for batch in batches:
            for key, crop, label in zip(batch.keys, batch.crops, batch.labels, strict=True):
                assert np.array_equal(crop.numpy(), truth[key][0]) and int(label) == truth[key][1]
            seen.extend(batch.keys)
        assert len(loader) == sum(1 for _ in loader)
    assert Counter(seen) == Counter(truth.keys())


def test_training_split_exactly_once_reshuffled_per_epoch(tmp_path):
    truth = make_shards(tmp_path, [7, 1, 10])  # 18 samples, 3 shards < 4 global workers, uneven
    shards = str(tmp_path / "train-*.tar")
    batch = 2

    def ranks(seed: int) -> list[ShardLoader]:
        return rank_loaders(shards, batch_size=batch, training=True, num_workers=2, seed=seed)

    def epoch(loaders: list[ShardLoader], number: int) -> list[list[str]]:
        per_rank = []
        for loader in loaders:
            loader.set_epoch(number)  # the loaders' worker processes persist across epochs
            keys, sizes = collect(loader)
            assert sizes == [batch] * len(loader)  # drop_last, same batch count on every rank
            per_rank.append(keys)
        return per_rank

    loaders = ranks(seed=3)
    first = epoch(loaders, 0)
    assert len(first[0]) == len(first[1]) == 8  # per rank ⌊18 / (2·2)⌋·2 samples
    everything = first[0] + first[1]
    assert len(set(everything)) == len(everything) and set(everything) <= set(truth)
    second = epoch(loaders, 1)
    assert second != first
    assert len(set(second[0] + second[1])) == 16
    assert epoch(loaders, 0) == first  # same seed and epoch → same order (workers saw set_epoch)
    assert epoch(ranks(seed=3), 0) == first  # …also from fresh loaders
    assert epoch(ranks(seed=4), 0) != first


def test_training_covers_everything_when_divisible(tmp_path):
    """With N a multiple of ranks × workers × batch, training drops nothing: every sample once."""
    truth = make_shards(tmp_path, [3, 9, 4])  # 16 = 2 ranks × 2 workers × batch 4
    seen = []
    shards = str(tmp_path / "train-*.tar")
    for loader in rank_loaders(shards, batch_size=4, training=True, num_workers=2, seed=11):
        loader.set_epoch(5)
        seen.extend(collect(loader)[0])
    assert Counter(seen) == Counter(truth.keys())


@pytest.mark.parametrize("training", [True, False])
def test_batches_do_not_depend_on_the_number_of_workers(tmp_path, training):
    """37 crops at batch 4 (9 steps whether 0 or 2 workers read them): 0, 1 and 2 workers
    give the same batches in the same order, epoch after epoch, on every rank."""
    make_shards(tmp_path, [11, 4, 13, 9], seed=int(np.random.default_rng().integers(1 << 30)))
    shards = str(tmp_path / "train-*.tar")
    for world in (1, 2):
        epochs = {}
        for workers in (0, 1, 2):
            loaders = rank_loaders(
                shards, world, batch_size=4, training=training, num_workers=workers, seed=7
            )
            runs = []
            for epoch in (0, 1):
                for loader in loaders:
                    loader.set_epoch(epoch)
                    runs.append([batch.keys for batch in loader])
                    assert len(runs[-1]) == len(loader)
            epochs[workers] = runs
        assert epochs[0] == epochs[1] == epochs[2]
        if training:  # per rank ⌊37 / (world · 4)⌋ full batches
            assert {len(run) for run in epochs[0]} == {37 // (world * 4)}
            assert epochs[0][0] != epochs[0][world]  # reshuffled in epoch 1
        else:  # every crop once, the ranks' last batches partial
            assert sorted(k for run in epochs[0][:world] for b in run for k in b) == sorted(
                k for run in epochs[0][world:] for b in run for k in b
            )
            assert sum(len(b) for run in epochs[0][:world] for b in run) == 37


@pytest.mark.parametrize(
    ("training", "workers", "sizes"), [(True, 2, [5, 9, 2]), (False, 2, [6, 7]), (False, 0, [4, 3])]
)
def test_resume_mid_epoch_continues_exactly(tmp_path, training, workers, sizes):
    make_shards(tmp_path, sizes)
    shards = str(tmp_path / "train-*.tar")

    def loader() -> ShardLoader:
        return ShardLoader(
            shards, batch_size=2, training=training, num_workers=workers, device="cpu", seed=9
        )

    first = loader()
    first.set_epoch(2)
    full = [batch.keys for batch in first]
    for done in sorted({1, 3, len(first) - 1}):
        partial = iter(first)
        for _ in range(done):
            next(partial)
        state = first.state_dict()
        assert state["epoch"] == 2 and state["batches"] == done
        resumed = loader()
        resumed.load_state_dict(state)
        assert [batch.keys for batch in resumed] == full[done:]
        assert [batch.keys for batch in resumed] == full  # later iterations start at the beginning


def test_single_process_loader_matches_truth_and_too_small_is_an_error(tmp_path):
    truth = make_shards(tmp_path, [4, 4])
    shards = str(tmp_path / "train-*.tar")
    loader = ShardLoader(shards, batch_size=3, training=True, num_workers=0, device="cpu", seed=1)
    assert len(loader) == 2
    for batch in loader:
        for key, crop in zip(batch.keys, batch.crops, strict=True):
            assert np.array_equal(crop.numpy(), truth[key][0])
    # One batch per rank is what training needs (loader workers do not matter): 8 < 3 × 3.
    with pytest.raises(ValueError, match="too few"):
        rank_loaders(shards, world_size=3, batch_size=3, training=True, num_workers=2)


# ----------------------------------------------------------------------------- zarr


def test_zarr_crops_reads_contract_layout(tmp_path):
    import zarr
    from zarr.codecs import BloscCodec

    rng = np.random.default_rng()
    crops = rng.integers(-1024, 3000, size=(3, 96, 96, 96), dtype=np.int16)
    group = zarr.open_group(str(tmp_path / "crops.zarr"), mode="w")
    array = group.create_array(
        "crops",
        shape=crops.shape,
        dtype="int16",
        chunks=(1, 96, 96, 96),
        compressors=BloscCodec(cname="zstd", clevel=3),
    )
    array[:] = crops
    group.create_array("classes", shape=(3,), dtype="int8")[:] = [1, -1, 0]
    group.create_array("grades", shape=(3,), dtype="int8")[:] = [2, -1, 0]
    keys = ["a_L1", "b_T12", "c-1_L2"]
    group.attrs.update(
        {"keys": keys, "splits": ["train", "unlabeled", "test"], "levels": ["L1", "T12", "L2"]}
    )
    store = ZarrCrops(tmp_path / "crops.zarr")
    assert store.keys == keys
    for i, key in enumerate(keys):
        assert np.array_equal(store.crop(key), crops[i]) and store.crop(key).dtype == np.int16
    assert [store.label(k) for k in keys] == [1, -1, 0]
    with pytest.raises(KeyError, match="nope"):
        store.crop("nope")


def test_a_shard_with_metadata_before_the_crop_indexes_each_sample_once(tmp_path):
    """WebDataset does not fix the order of a sample's members: `KEY.json` may come first."""
    rng = np.random.default_rng()
    crops = {key: rng.integers(-2000, 3000, size=(6, 4, 4), dtype=np.int16) for key in "ab"}
    path = tmp_path / "json-first-000000.tar"
    with tarfile.open(path, "w") as tar:
        for key, crop in crops.items():
            npy = io.BytesIO()
            np.save(npy, crop)
            for name, data in [
                (f"{key}.json", json.dumps({"level": "L1"}).encode()),
                (f"{key}.crop.npy", npy.getvalue()),
                (f"{key}.cls", b"1"),
            ]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    loader = ShardLoader(str(path), batch_size=4, training=False, num_workers=0, device="cpu")
    assert collect(loader) == (["a", "b"], [2])
    [batch] = list(loader)
    assert batch.labels.tolist() == [1, 1]
    for key, crop in zip(batch.keys, batch.crops, strict=True):
        assert np.array_equal(crop.numpy(), crops[key])
