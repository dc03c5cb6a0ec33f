"""Faults a hostile user meets in the training commands: each expected failure is one
line naming the file and the problem with exit 1 (usage errors: 2), a bug keeps its traceback,
bad labels are refused before the first step, resume is exact after kill -9 at 2 loader workers,
refuses changed settings and falls back to the previous checkpoint when the newest is damaged.

Runs go through the command line (typer's CliRunner) with `--model tiny` shrunk to the small
test model of tests/test_train.py, on its easy synthetic shards, so each takes seconds.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    SMALL_MODEL,
    cli,
    easy_crop,
    latest_checkpoint,
    one_line_error,
    read_log,
    shrink,
    stop_before_epoch,
    train_val_thin_shards,
    write_shard,
    write_split,
)
from safetensors.torch import load_file

from vctmae.train.checkpoint import load_state

# ----------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def small_tiny(monkeypatch):
    shrink(monkeypatch)


def pretrain_args(shards: list[str], out: Path, *extra: object) -> list[object]:
    return ["pretrain", "--shards", *shards, "--model", "tiny", "--epochs", 3,
            "--warmup-epochs", 1, "--batch-size", 8, "--blr", 0.05, "--workers", 0,
            "--device", "cpu", "--no-progress", "--out", out, *extra]  # fmt: skip


def finetune_args(shards: list[str], val: list[str], out: Path, *extra: object) -> list[object]:
    return ["finetune", "--shards", *shards, *(["--val-shards", *val] if val else []),
            "--model", "tiny", "--epochs", 1, "--warmup-epochs", 0, "--batch-size", 8,
            "--lr", 1e-3, "--multiview", 1, "--workers", 0, "--device", "cpu", "--no-progress",
            "--out", out, *extra]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, list[str]]:
    root = tmp_path_factory.mktemp("faults")
    rng = np.random.default_rng(5)
    unlabelled = root / "unl" / "unlabeled-000000.tar"
    unlabelled.parent.mkdir()
    write_shard(unlabelled, [(f"u{i:02d}_L1", easy_crop(rng, i % 2), None) for i in range(8)])
    seven = root / "odd-000000.tar"
    write_shard(seven, [(f"s{i:02d}_L2", easy_crop(rng, 1), 7 if i == 3 else i % 2) for i in range(8)])  # fmt: skip
    return {
        **train_val_thin_shards(root, rng),
        "unlabelled": [str(unlabelled)],
        "seven": [str(seven)],
    }


def stopped_pretraining(data, root: Path, completed: int) -> Path:
    """A 3-epoch pretraining run stopped by Ctrl-C after `completed` epochs."""
    out = root / "pre"
    with pytest.MonkeyPatch.context() as patch:
        shrink(patch)
        stop_before_epoch(patch, completed)
        result = cli(*pretrain_args(data["train"], out))
    assert result.exit_code == 130, result.output
    return out


@pytest.fixture(scope="module")
def stopped_run(data, tmp_path_factory) -> Path:
    """Two of three epochs done: two checkpoints (copy the run before changing it)."""
    return stopped_pretraining(data, tmp_path_factory.mktemp("stopped"), completed=2)


@pytest.fixture(scope="module")
def first_epoch_run(data, tmp_path_factory) -> Path:
    """One of three epochs done: one checkpoint, nothing to fall back to."""
    return stopped_pretraining(data, tmp_path_factory.mktemp("first"), completed=1)


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


@pytest.fixture(scope="module")
def classifier_file(tmp_path_factory) -> Path:
    from vctmae.model import build_classifier
    from vctmae.model.checkpoint import save_model

    root = tmp_path_factory.mktemp("classifier")
    return save_model(build_classifier("tiny", **SMALL_MODEL), root / "cls.safetensors")


@pytest.fixture(scope="module")
def mae_file(tmp_path_factory) -> Path:
    from vctmae.model import build_mae
    from vctmae.model.checkpoint import save_model

    root = tmp_path_factory.mktemp("mae")
    return save_model(build_mae("tiny", **SMALL_MODEL), root / "mae.safetensors")


# ----------------------------------------------------------------------------- labels


@pytest.mark.parametrize(
    ("train", "val", "needles"),
    [
        (("train", "unlabelled"), ("val",), ("unlabeled-000000.tar", "8 unlabelled", "training")),
        (("train", "seven"), ("val",), ("odd-000000.tar", "1 class 7, e.g. s03_L2", "training")),
        (("train",), ("unlabelled",), ("unlabeled-000000.tar", "validation samples")),
    ],
)
def test_finetune_refuses_bad_classes_before_the_first_step(data, tmp_path, train, val, needles):
    out = tmp_path / "ft"
    shards = [p for name in train for p in data[name]]
    val_shards = [p for name in val for p in data[name]]
    result = cli(*finetune_args(shards, val_shards, out))
    one_line_error(result, 1, *needles)
    assert not (out / "checkpoints").exists() and not (out / "log.jsonl").exists()


def test_eval_refuses_bad_classes_before_writing_anything(data, classifier_file, tmp_path):
    for shards, needle in ((data["seven"], "class 7"), (data["val"] + data["unlabelled"], "8 unlabelled")):  # fmt: skip
        out = tmp_path / "report"
        result = cli("eval", "--checkpoint", classifier_file, "--shards", *shards, "--multiview",
                     1, "--workers", 0, "--device", "cpu", "--out", out)  # fmt: skip
        one_line_error(result, 1, Path(shards[-1]).name, needle)
        assert not out.exists()
    # Unlabelled shards on their own: predictions without metrics, as before.
    out = tmp_path / "unlabelled-report"
    result = cli("eval", "--checkpoint", classifier_file, "--shards", *data["unlabelled"],
                 "--multiview", 1, "--workers", 0, "--device", "cpu", "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((out / "metrics.json").read_text())["n"] == 8


# ----------------------------------------------------------------------------- kill -9

KILLED_RUN = r"""
import json, os, signal, sys
from pathlib import Path
from vctmae.data.loader import ShardLoader
from vctmae.data.options import LoaderOptions
from vctmae.train.config import FinetuneConfig, RunOptions
from vctmae.train.finetune import run_finetune

train, val, out, small = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
original = ShardLoader.__iter__

def killed_in_second_epoch(self):
    for number, batch in enumerate(original(self)):
        if self.training and self.epoch == 1 and number == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        yield batch

ShardLoader.__iter__ = killed_in_second_epoch
run = RunOptions(shards=tuple(train), out=Path(out), model="tiny", model_overrides=small,
                 loader=LoaderOptions(workers=2), device="cpu", progress=False)
run_finetune(FinetuneConfig(run=run, val_shards=tuple(val), epochs=2, warmup_epochs=1, batch_size=8,
                            lr=1e-3, multiview=1))
"""


def test_finetune_resume_after_kill_9_is_bit_exact_at_two_workers(data, tmp_path):
    """Killed with SIGKILL in the middle of epoch 2 of 2 at `--workers 2` (head dropout on),
    resumed: the weights, optimizer moments and RNG streams equal an uninterrupted run's."""
    from vctmae.data.options import LoaderOptions
    from vctmae.train.config import FinetuneConfig, RunOptions
    from vctmae.train.finetune import run_finetune

    def config(out: Path, **changes) -> FinetuneConfig:
        run = RunOptions(shards=tuple(data["train"]), out=out, model="tiny",
                         model_overrides=SMALL_MODEL, loader=LoaderOptions(workers=2),
                         device="cpu", progress=False, **changes)  # fmt: skip
        return FinetuneConfig(run=run, val_shards=tuple(data["val"]), epochs=2, warmup_epochs=1,
                              batch_size=8, lr=1e-3, multiview=1)  # fmt: skip

    from vctmae.model.config import preset_config

    # Head dropout on: every step draws from torch's global RNG, which resume must restore.
    assert preset_config("tiny", **SMALL_MODEL).head_dropout > 0
    script = tmp_path / "killed.py"
    script.write_text(KILLED_RUN)
    cut = tmp_path / "cut"
    # Output to a file, not a pipe: the killed run's orphaned loader workers (which exit by
    # themselves within seconds) would hold a pipe open.
    with (tmp_path / "killed.log").open("w") as log:
        # The same number of threads as this process: fp32 sums split across threads round
        # differently, and the run resumed here must continue the killed run's exact numbers.
        env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
        killed = subprocess.run(
            [sys.executable, str(script), json.dumps(data["train"]), json.dumps(data["val"]),
             str(cut), json.dumps(SMALL_MODEL)],
            stdout=log, stderr=subprocess.STDOUT, timeout=300, env=env,
        )  # fmt: skip
    output = (tmp_path / "killed.log").read_text()
    assert killed.returncode == -signal.SIGKILL, output[-2000:]
    assert json.loads((cut / "checkpoints" / "finetune" / "last.json").read_text())["epoch"] == 1

    resumed = run_finetune(config(cut, resume=True))
    full = run_finetune(config(tmp_path / "full"))
    assert resumed.state.step == full.state.step and resumed.state.epoch == full.state.epoch == 2
    a, b = (
        load_file(str(latest_checkpoint(run, "finetune")[0])) for run in (tmp_path / "full", cut)
    )
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the full run"
    state_a, state_b = (
        load_state(latest_checkpoint(run, "finetune")[1]) for run in (tmp_path / "full", cut)
    )
    assert torch.equal(state_a["torch_rng"], state_b["torch_rng"])
    assert torch.equal(state_a["generators"][0], state_b["generators"][0])
    moments = state_a["optimizer"]["state"][0]["exp_avg"]
    assert torch.equal(moments, state_b["optimizer"]["state"][0]["exp_avg"])


# ----------------------------------------------------------------------------- one line


class FullDisk:
    """`open` for vctmae.model.checkpoint: a file whose name contains `match` fails with ENOSPC
    after 64 bytes, as a write to a full disk does; every other file opens normally."""

    def __init__(self, match: str) -> None:
        self.match = match

    def __call__(self, path, mode="r", *args, **kwargs):
        handle = builtins.open(path, mode, *args, **kwargs)
        return _Filling(handle) if self.match in os.path.basename(path) else handle


class _Filling:
    def __init__(self, handle) -> None:
        self.handle, self.left = handle, 64

    def write(self, data) -> int:
        if len(data) > self.left:
            self.handle.write(bytes(data)[: self.left])
            self.left = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.left -= len(data)
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(
    data, stopped_run, tmp_path, monkeypatch
):
    """The disk fills while epoch 3's training state is written: one line, exit 1, no temporary
    file left, the epoch-2 checkpoint still current and loadable."""
    import vctmae.files as weights_io

    run = copy_run(stopped_run, tmp_path)
    with monkeypatch.context() as full:
        full.setattr(weights_io, "open", FullDisk("epoch-0003.state.pt"), raising=False)
        result = cli(*pretrain_args(data["train"], run, "--resume"))
    one_line_error(
        result,
        1,
        f"no space left on device writing {run / 'checkpoints' / 'pretrain' / 'epoch-0003.state.pt'}",
        "earlier outputs are intact",
    )
    checkpoints = run / "checkpoints" / "pretrain"
    assert not list(checkpoints.glob(".tmp-*"))
    weights, state = latest_checkpoint(run, "pretrain")
    assert weights.name == "epoch-0002.safetensors" and load_state(state)["epoch"] == 2
    # Space again: the run continues from the intact epoch-2 checkpoint.
    finished = cli(*pretrain_args(data["train"], run, "--resume"))
    assert finished.exit_code == 0, finished.output
    assert latest_checkpoint(run, "pretrain")[0].name == "epoch-0003.safetensors"


def test_out_naming_a_file_is_a_usage_error(data, classifier_file, tmp_path):
    taken = tmp_path / "taken.txt"
    taken.write_text("not a folder\n")
    one_line_error(cli(*pretrain_args(data["train"], taken)), 2, str(taken), "--out names a file")
    result = cli("eval", "--checkpoint", classifier_file, "--shards", *data["val"], "--out", taken)
    one_line_error(result, 2, str(taken), "--out names a file")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "text"])
def test_damaged_init_file_is_named(data, mae_file, tmp_path, damage):
    bad = tmp_path / ("init.safetensors" if damage != "text" else "notes.pth")
    whole = mae_file.read_bytes()
    content = {
        "truncated": whole[: len(whole) // 2],
        "garbage": np.random.default_rng().bytes(4000),
        "text": b"these are my notes, not weights\n" * 20,
    }[damage]
    bad.write_bytes(content)
    shutil.copy(mae_file.with_suffix(".json"), bad.with_suffix(".json"))
    result = cli(*finetune_args(data["train"], [], tmp_path / "ft", "--init", bad))
    line = one_line_error(result, 1, str(bad))
    assert "101" not in line


@pytest.mark.parametrize("damage", ["weights", "state", "malicious", "pointer"])
def test_damaged_resume_files_are_named(data, first_epoch_run, tmp_path, damage):
    """A run with one checkpoint (no previous one to fall back to) whose files are damaged."""
    run = copy_run(first_epoch_run, tmp_path)
    checkpoints = run / "checkpoints" / "pretrain"
    marker = tmp_path / "payload-ran"
    target = {
        "weights": checkpoints / "epoch-0001.safetensors",
        "state": checkpoints / "epoch-0001.state.pt",
        "malicious": checkpoints / "epoch-0001.state.pt",
        "pointer": checkpoints / "last.json",
    }[damage]
    if damage == "malicious":
        torch.save({"step": Payload(f"touch {marker}")}, target)
    elif damage == "pointer":
        target.write_text('{"epoch": 1, "weights": ')
    else:
        target.write_bytes(target.read_bytes()[:100])
    result = cli(*pretrain_args(data["train"], run, "--resume"))
    line = one_line_error(result, 1, str(target))
    assert "weights_only" not in result.output and not marker.exists()
    if damage == "malicious":
        assert "refused" in line


class Payload:
    """What a malicious checkpoint holds: unpickling it would run a shell command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_eval_and_explain_refuse_a_pretraining_checkpoint(data, mae_file, tmp_path):
    result = cli("eval", "--checkpoint", mae_file, "--shards", *data["val"], "--workers", 0,
                 "--device", "cpu", "--out", tmp_path / "report")  # fmt: skip
    one_line_error(result, 1, str(mae_file), "pretraining (MAE) checkpoint")
    result = cli("explain", "--checkpoint", mae_file, "--zarr", tmp_path / "crops.zarr", "--key",
                 "x_L1", "--out", tmp_path / "x.png")  # fmt: skip
    one_line_error(result, 1, str(mae_file), "pretraining (MAE) checkpoint")


def test_dali_loader_without_dali_names_the_extra(data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import nvidia.dali now fails
    result = cli(*pretrain_args(data["train"], tmp_path / "pre", "--loader", "dali"))
    one_line_error(result, 1, "--loader dali", "pip install 'vctmae[dali]'")


def test_crops_too_thin_for_the_frames_name_the_shard(data, classifier_file, tmp_path):
    result = cli(*pretrain_args(data["thin"], tmp_path / "pre"))
    one_line_error(result, 1, data["thin"][0], "16 frames × stride 6 do not fit 64 slices")
    result = cli("eval", "--checkpoint", classifier_file, "--shards", *data["thin"], "--workers",
                 0, "--device", "cpu", "--out", tmp_path / "report")  # fmt: skip
    one_line_error(result, 1, data["thin"][0], "do not fit 64 slices")


def test_bad_flag_values_are_usage_errors(data, tmp_path):
    one_line_error(cli(*pretrain_args(data["train"], tmp_path / "a", "--model", "huge")), 2, "huge")
    result = cli(*finetune_args(data["train"], [], tmp_path / "b", "--multiview", 3))
    one_line_error(result, 2, "multiview")


@pytest.mark.parametrize(
    "bug",
    [RuntimeError("simulated bug"), KeyError("simulated"), torch.OutOfMemoryError("CUDA OOM")],
    ids=["RuntimeError", "KeyError", "OutOfMemoryError"],
)
def test_a_genuine_bug_keeps_its_traceback(data, tmp_path, monkeypatch, bug):
    from vctmae.train.loop import Trainer

    def broken(self):
        raise bug

    monkeypatch.setattr(Trainer, "_save", broken)
    result = cli(*pretrain_args(data["train"], tmp_path / "pre", "--epochs", 1, "--warmup-epochs", 0))  # fmt: skip
    assert result.exception is bug  # not turned into `error: …` and exit 1
    assert not [line for line in result.output.splitlines() if line.startswith("error:")]


# ----------------------------------------------------------------------------- items 8 and 9


def test_ctrl_c_says_what_is_kept_and_how_to_resume(data, tmp_path, monkeypatch):
    # Pretraining: the module's stopped runs check exit 130; here finetuning, and the message.
    stop_before_epoch(monkeypatch, 1)
    out = tmp_path / "ft"
    result = cli(*finetune_args(data["train"], data["val"], out, "--epochs", 2))
    assert result.exit_code == 130, result.output
    assert (
        f"checkpoints of completed epochs are kept in {out / 'checkpoints' / 'finetune'}"
        in result.output
    )
    assert "--resume" in result.output and "Traceback" not in result.output
    assert latest_checkpoint(out, "finetune")[0].name == "epoch-0001.safetensors"


def test_pretraining_ctrl_c_message(data, tmp_path, monkeypatch):
    stop_before_epoch(monkeypatch, 0)
    out = tmp_path / "pre"
    result = cli(*pretrain_args(data["train"], out))
    assert result.exit_code == 130, result.output
    assert "pretraining stopped" in result.output and "--resume" in result.output


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--batch-size", 4), ("--epochs", 4), ("--blr", 0.1), ("--seed", 1), ("--mask-ratio", 0.7),
     ("--model", "small")],
)  # fmt: skip
def test_resume_refuses_a_changed_setting(data, stopped_run, tmp_path, flag, value):
    run = copy_run(stopped_run, tmp_path)
    result = cli(*pretrain_args(data["train"], run, "--resume", flag, value))
    one_line_error(
        result, 2, str(run / "checkpoints" / "pretrain" / "epoch-0002.state.pt"), f"{flag} "
    )
    assert latest_checkpoint(run, "pretrain")[0].name == "epoch-0002.safetensors"


def test_resume_refuses_another_number_of_processes(data, stopped_run, tmp_path):
    """A run saved by 2 processes (its state says so) resumed by 1: other ranks would get other
    shards and batches, and the global batch and steps per epoch would change."""
    run = copy_run(stopped_run, tmp_path)
    newest = run / "checkpoints" / "pretrain" / "epoch-0002.state.pt"
    state = torch.load(newest, weights_only=True)
    assert state["world_size"] == 1
    state["world_size"] = 2
    state["generators"] = state["generators"] * 2
    torch.save(state, newest)
    result = cli(*pretrain_args(data["train"], run, "--resume"))
    one_line_error(result, 2, str(newest), "saved by 2", "resume with 2")
    assert latest_checkpoint(run, "pretrain")[0].name == "epoch-0002.safetensors"


def test_resume_refuses_other_shards(data, stopped_run, tmp_path):
    run = copy_run(stopped_run, tmp_path)
    result = cli(*pretrain_args(data["train"] + data["val"], run, "--resume"))
    one_line_error(result, 2, "--shards")


def test_resume_accepts_harmless_changes_and_keeps_two_checkpoints(data, stopped_run, tmp_path):
    run = copy_run(stopped_run, tmp_path)
    # Quoted glob instead of the shell's paths, another worker count, log cadence and progress.
    pattern = str(Path(data["train"][0]).parent / "train-*.tar")
    args = pretrain_args([pattern], run, "--resume", "--workers", 1, "--log-every", 1, "--progress")
    result = cli(*args)
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (run / "checkpoints" / "pretrain").glob("epoch-*.safetensors"))
    assert names == ["epoch-0002.safetensors", "epoch-0003.safetensors"]


@pytest.mark.parametrize("damaged", ["epoch-0002.safetensors", "epoch-0002.state.pt"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(
    data, stopped_run, tmp_path, damaged
):
    run = copy_run(stopped_run, tmp_path)
    newest = run / "checkpoints" / "pretrain" / damaged
    newest.write_bytes(newest.read_bytes()[:200])
    result = cli(*pretrain_args(data["train"], run, "--resume"))
    assert result.exit_code == 0, result.output
    warning = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and str(newest) in warning[0], result.output
    assert "epoch-0001.safetensors (epoch 1)" in warning[0]
    resumes = [r for r in read_log(run / "log.jsonl") if r["event"] == "resume"]
    assert resumes[-1]["epoch"] == 1  # epochs 2 and 3 were trained again
    epochs = [r["epoch"] for r in read_log(run / "log.jsonl") if r["event"] == "epoch"]
    assert epochs == [1, 2, 2, 3]


# ----------------------------------------------------------------------------- option values


@pytest.mark.parametrize(
    ("command", "flag", "value", "needle"),
    [
        ("finetune", "--warmup-lr", -1, "--warmup-lr must be a finite number >= 0, got -1"),
        ("finetune", "--min-lr", 0.01, "--min-lr 0.01 is above the peak learning rate 0.001"),
        ("finetune", "--lr", "nan", "--lr must be a finite positive number, got nan"),
        ("finetune", "--grad-clip", "nan", "--grad-clip must be a finite positive number, got nan"),
        ("pretrain", "--seed", -1, "--seed must lie in [0, 4294967295], got -1"),
        ("pretrain", "--blr", "inf", "--blr must be a finite positive number, got inf"),
        (
            "pretrain",
            "--weight-decay",
            "nan",
            "--weight-decay must be a finite number >= 0, got nan",
        ),
        ("pretrain", "--min-lr", 0.01, "--min-lr 0.01 is above the peak learning rate 0.0015625"),
    ],
)
def test_unusable_numbers_are_usage_errors(data, tmp_path, command, flag, value, needle):
    """Each value once ran (a climbing loss, a schedule that rises) or ended in a traceback."""
    out = tmp_path / "run"
    make = pretrain_args if command == "pretrain" else lambda s, o, *e: finetune_args(s, [], o, *e)
    one_line_error(cli(*make(data["train"], out, flag, value)), 2, needle)
    assert not (out / "log.jsonl").exists()


def test_a_class_too_large_for_the_index_names_shard_and_member(data, tmp_path):
    rng = np.random.default_rng(8)
    shard = tmp_path / "huge-000000.tar"
    huge = 99999999999999999999999
    write_shard(shard, [(f"h{i}_L1", easy_crop(rng, 1), huge if i == 3 else i % 2) for i in range(8)])  # fmt: skip
    needles = (str(shard), f"h3_L1.cls: class {huge} is out of range")
    one_line_error(cli(*pretrain_args([str(shard)], tmp_path / "pre")), 1, *needles)
    one_line_error(cli(*finetune_args([str(shard)], [], tmp_path / "ft")), 1, *needles)


# ----------------------------------------------------------------------------- one run per --out

HOLD_AND_DIE = r"""
import os, signal, sys
from vctmae.outlock import hold_output

with hold_output(sys.argv[1], "pretrain"):
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("command", ["pretrain", "finetune", "eval", "predict"])
def test_a_second_run_into_the_same_out_is_refused_naming_the_first(
    data, classifier_file, tmp_path, command
):
    from vctmae.outlock import LOCK_NAME, hold_output

    out = tmp_path / "run"
    for scan in ("ct.nii.gz", "seg.nii.gz"):
        (tmp_path / scan).write_bytes(b"never read: the lock is taken first")
    args = {
        "pretrain": pretrain_args(data["train"], out),
        "finetune": finetune_args(data["train"], [], out),
        "eval": ["eval", "--checkpoint", classifier_file, "--shards", *data["val"],
                 "--workers", 0, "--device", "cpu", "--out", out],
        "predict": ["predict", "--checkpoint", classifier_file, "--ct", tmp_path / "ct.nii.gz",
                    "--seg", tmp_path / "seg.nii.gz", "--out", out],
    }[command]  # fmt: skip
    with hold_output(out, "pretrain"):  # as a run in another process holds it
        result = cli(*args)
        one_line_error(
            result, 1, str(out), f"`vctmae pretrain` (pid {os.getpid()}) is writing here"
        )
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    assert not out.exists()  # the holder wrote nothing: no folder is left behind


def test_a_lock_left_by_a_killed_run_is_taken_over_saying_so(data, tmp_path):
    from vctmae.outlock import LOCK_NAME

    out = tmp_path / "pre"
    script = tmp_path / "hold_and_die.py"
    script.write_text(HOLD_AND_DIE)
    killed = subprocess.Popen([sys.executable, str(script), str(out)], stderr=subprocess.PIPE)
    _, stderr = killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    assert (out / LOCK_NAME).read_text() == f"{killed.pid} pretrain\n"
    result = cli(*pretrain_args(data["train"], out, "--epochs", 1, "--warmup-epochs", 0))
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: {out}: taking over the lock of `vctmae pretrain` (pid {killed.pid}), "
        "which ended without releasing it"
    ]
    assert not (out / LOCK_NAME).exists()


def test_under_torchrun_only_rank_0_takes_the_lock(tmp_path, monkeypatch):
    """The other processes of a torchrun job run while their rank 0 holds the folder."""
    from vctmae.outlock import LOCK_NAME, OutputLockedError, hold_output

    out = tmp_path / "run"
    with hold_output(out, "pretrain"):  # rank 0 of the job
        monkeypatch.setenv("RANK", "1")
        with hold_output(out, "pretrain"):
            assert (out / LOCK_NAME).read_text() == f"{os.getpid()} pretrain\n"
        monkeypatch.setenv("RANK", "0")  # another job's rank 0 is refused
        with pytest.raises(OutputLockedError), hold_output(out, "pretrain"):
            pass


def test_pretraining_and_finetuning_in_one_folder_keep_their_own_checkpoints(data, tmp_path):
    """Each run kind prunes and resumes only its own checkpoints."""
    out = tmp_path / "both"
    result = cli(*finetune_args(data["train"], [], out, "--epochs", 2, "--warmup-epochs", 1))
    assert result.exit_code == 0, result.output
    finetuned = {p.name: p.read_bytes() for p in (out / "checkpoints" / "finetune").iterdir()}
    result = cli(*pretrain_args(data["train"], out))  # 3 epochs: prunes its epoch 1
    assert result.exit_code == 0, result.output
    pretrained = sorted(p.name for p in (out / "checkpoints" / "pretrain").glob("*.safetensors"))
    assert pretrained == ["epoch-0002.safetensors", "epoch-0003.safetensors"]
    assert {
        p.name: p.read_bytes() for p in (out / "checkpoints" / "finetune").iterdir()
    } == finetuned
    assert latest_checkpoint(out, "finetune")[0].name == "epoch-0002.safetensors"
    # Finetuning resumes from its own checkpoint (a pretraining state would be refused).
    args = finetune_args(data["train"], [], out, "--epochs", 2, "--warmup-epochs", 1, "--resume")
    result = cli(*args)
    assert result.exit_code == 0, result.output
    resumes = [r for r in read_log(out / "log.jsonl") if r["event"] == "resume"]
    assert [r["epoch"] for r in resumes] == [2] and "finetune" in resumes[0]["checkpoint"]


# ----------------------------------------------------------------------------- changed inputs


@pytest.mark.parametrize("change", ["fewer crops", "relabelled"])
def test_resume_refuses_a_shard_changed_under_its_name(tmp_path, change):
    """The run's settings are unchanged (same paths), but a shard's contents are not."""
    shards = [str(p) for p in write_split(tmp_path / "data", "train", 16, seed=1, shards=2)]
    out = tmp_path / "pre"
    with pytest.MonkeyPatch.context() as patch:
        shrink(patch)
        stop_before_epoch(patch, 1)
        assert cli(*pretrain_args(shards, out)).exit_code == 130
    rng = np.random.default_rng(4)
    if change == "fewer crops":
        samples = [(f"new{i:03d}_L1", easy_crop(rng, i % 2), i % 2) for i in range(5)]
        needle = "crops 8 → 5"
    else:  # the same keys and bytes but every class flipped: only the index digest differs
        samples = [(f"train{i:03d}_L1", easy_crop(rng, i % 2), 1 - i % 2) for i in range(8)]
        needle = "same size, another index"
    Path(shards[0]).unlink()
    write_shard(Path(shards[0]), samples)
    result = cli(*pretrain_args(shards, out, "--resume"))
    one_line_error(result, 1, shards[0], "changed since the run was saved", needle)
    assert latest_checkpoint(out, "pretrain")[0].name == "epoch-0001.safetensors"


def test_resume_refuses_a_validation_shard_changed_under_its_name(data, tmp_path):
    """Validation decides the best epoch and early stopping: its shards are compared too."""
    val = tmp_path / "val" / "val-000000.tar"
    rng = np.random.default_rng(6)
    write_shard(val, [(f"v{i:02d}_L1", easy_crop(rng, i % 2), i % 2) for i in range(8)])
    out = tmp_path / "ft"
    args = finetune_args(data["train"], [str(val)], out, "--epochs", 2)
    with pytest.MonkeyPatch.context() as patch:
        shrink(patch)
        stop_before_epoch(patch, 1)
        assert cli(*args).exit_code == 130
    val.unlink()
    write_shard(val, [(f"v{i:02d}_L1", easy_crop(rng, i % 2), i % 2) for i in range(6)])
    one_line_error(cli(*args, "--resume"), 1, str(val), "changed since the run", "crops 8 → 6")


def test_a_shard_listed_twice_is_refused(data, classifier_file, tmp_path):
    shard = Path(data["train"][0])
    again = f"{shard.parent}/./{shard.name}"
    needles = (again, "listed twice in the shard list", f"(also as {shard})")
    one_line_error(cli(*pretrain_args([str(shard), again], tmp_path / "pre")), 1, *needles)
    result = cli("eval", "--checkpoint", classifier_file, "--shards", shard, again, "--workers",
                 0, "--device", "cpu", "--out", tmp_path / "report")  # fmt: skip
    one_line_error(result, 1, *needles)


def test_resume_without_a_checkpoint_says_it_starts_afresh(data, tmp_path):
    args = pretrain_args(data["train"], tmp_path / "new", "--resume", "--epochs", 1)
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert "--resume: no pretrain checkpoint" in " ".join(result.output.split())
