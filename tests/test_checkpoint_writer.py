"""Checkpoints off the critical path: `--checkpoint-every N` and the background writer."""

from __future__ import annotations

import json
import threading
import time

from helpers import read_log

from vctmae.data.options import LoaderOptions
from vctmae.synth.phantoms import write_random_shards
from vctmae.train.config import PretrainConfig, RunOptions
from vctmae.train.pretrain import run_pretrain

SMALL_MODEL = {
    "embed_dim": 32,
    "depth": 1,
    "num_heads": 2,
    "decoder_embed_dim": 16,
    "decoder_depth": 1,
    "decoder_num_heads": 2,
}


def config(shards, out, **changes) -> PretrainConfig:
    run = RunOptions(
        shards=tuple(shards), out=out, model="tiny", model_overrides=SMALL_MODEL,
        loader=LoaderOptions(workers=0), device="cpu", progress=False, max_steps_per_epoch=1,
        **changes,
    )  # fmt: skip
    return PretrainConfig(run=run, epochs=3, warmup_epochs=0, batch_size=4, preview=False)


def test_checkpoint_every_two_epochs_and_after_the_last(tmp_path):
    shards = write_random_shards(tmp_path / "shards", 8)
    out = tmp_path / "run"
    run_pretrain(config(shards, out, checkpoint_every=2))
    names = sorted(p.name for p in (out / "checkpoints" / "pretrain").glob("epoch-*.state.pt"))
    assert names == ["epoch-0002.state.pt", "epoch-0003.state.pt"]
    pointer = json.loads((out / "checkpoints" / "pretrain" / "last.json").read_text())
    assert pointer["epoch"] == 3 and [e["epoch"] for e in pointer["previous"]] == [2]
    assert [r["epoch"] for r in read_log(out / "log.jsonl") if r["event"] == "epoch"] == [1, 2, 3]


def test_checkpoints_are_written_while_the_next_epoch_trains(tmp_path, monkeypatch):
    """A slow disk: the epoch-1 checkpoint is still being written when epoch 2 starts, and the
    run still ends with every checkpoint complete."""
    from vctmae.data.loader import ShardLoader
    from vctmae.train import checkpoint

    shards = write_random_shards(tmp_path / "shards", 8)
    written: dict[int, float] = {}
    writer_threads: set[str] = set()
    original_save = checkpoint.save_checkpoint

    def slow_save(run_dir, *, epoch, **files):
        writer_threads.add(threading.current_thread().name)
        time.sleep(1.5)
        pointer = original_save(run_dir, epoch=epoch, **files)
        written[epoch] = time.perf_counter()
        return pointer

    started: dict[int, float] = {}
    original_epoch = ShardLoader.set_epoch

    def recording_epoch(self, epoch):
        started.setdefault(epoch, time.perf_counter())
        original_epoch(self, epoch)

    monkeypatch.setattr(checkpoint, "save_checkpoint", slow_save)
    monkeypatch.setattr(ShardLoader, "set_epoch", recording_epoch)
    run_pretrain(config(shards, tmp_path / "run"))
    assert writer_threads == {"vctmae-checkpoints"}
    assert sorted(written) == [1, 2, 3]
    # Epoch 2 (index 1) began before the epoch-1 checkpoint was on disk.
    assert started[1] < written[1]
    assert (
        json.loads((tmp_path / "run" / "checkpoints" / "pretrain" / "last.json").read_text())[
            "epoch"
        ]
        == 3
    )
