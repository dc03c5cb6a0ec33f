"""Trainers, schedule, checkpoints/resume, NaN guard (vctmae.train); evaluation, explain (vctmae.infer).

The training runs use a shrunken tiny model and a small, easy synthetic labelled
set written straight to WebDataset shards (class 1: a dense vertebral body,
class 0: a faint one, at random positions with noise), so each run takes
seconds on 2 cores. The real pipeline (phantoms → ingest → …) is covered by
tests/test_demo.py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    SMALL_MODEL,
    TEST_RUN,
    easy_crop,
    eval_config,
    latest_checkpoint,
    pretrain_config,
    read_log,
    read_predictions,
    stop_before_epoch,
)
from safetensors.torch import load_file
from sklearn import metrics as sk

from vctmae.data.options import LoaderOptions
from vctmae.infer.config import EvalConfig, SpeedOptions
from vctmae.infer.evaluate import run_eval
from vctmae.infer.metrics import compute_metrics
from vctmae.train.config import FinetuneConfig, RunOptions
from vctmae.train.finetune import run_finetune
from vctmae.train.loop import NonFiniteLossError
from vctmae.train.pretrain import run_pretrain
from vctmae.train.schedule import WarmupCosine


def weights_of(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# -- schedule and optimizer ----------------------------------------------------------------


def test_schedule_matches_formula_at_several_steps(tmp_path):
    schedule = WarmupCosine(
        peak_lr=4e-3, total_steps=100, warmup_steps=40, start_lr=1e-8, end_lr=1e-7
    )
    assert schedule(0) == pytest.approx(1e-8)
    assert schedule(20) == pytest.approx(1e-8 + (4e-3 - 1e-8) * 20 / 40)
    assert schedule(40) == pytest.approx(4e-3)
    for step in (55, 70, 99):
        expected = 1e-7 + (4e-3 - 1e-7) * 0.5 * (1 + math.cos(math.pi * (step - 40) / 60))
        assert schedule(step) == pytest.approx(expected, rel=1e-12)
    assert schedule(70) == pytest.approx((4e-3 + 1e-7) / 2)
    # The paper's scaling rule: blr 1e-3, batch 8 on 4 processes with 2 accumulation steps.
    config = pretrain_config(["train-000000.tar"], tmp_path, blr=1e-3, batch_size=8, accum_steps=2)
    assert config.peak_lr(4) == pytest.approx(1e-3 * 64 / 256)


def test_weight_decay_skips_norms_biases_and_embeddings():
    from vctmae.model import build_mae
    from vctmae.train.optim import param_groups

    model = build_mae("tiny", **SMALL_MODEL)
    decay, keep = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in keep["params"]}
    assert decay["weight_decay"] == 0.05 and keep["weight_decay"] == 0.0
    for name in (
        "pos_embed_spatial",
        "pos_embed_temporal",
        "cls_token",
        "mask_token",
        "decoder_pos_embed",
    ):
        assert name in kept
    assert all(n.endswith(".bias") or "norm" in n or "pos_embed" in n or "token" in n for n in kept)
    assert "blocks.0.attn.qkv.weight" in decayed and "patch_embed.proj.weight" in decayed
    assert len(decayed) + len(kept) == len(list(model.parameters()))


# -- pretraining -------------------------------------------------------------------------------


def test_pretraining_lowers_the_loss_and_logs_its_schedule(easy_data, tmp_path):
    out = tmp_path / "pre"
    # Raw [0, 1] targets (the paper's input): the bar below was set on that loss scale.
    raw = {**SMALL_MODEL, "input_mean": 0.0, "input_std": 1.0}
    result = run_pretrain(pretrain_config(easy_data["train"], out, epochs=4, model_overrides=raw))
    losses = [h["loss"] for h in result.state.history]
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0], losses
    records = read_log(out / "log.jsonl")
    start = records[0]
    assert start["event"] == "start" and start["config"]["epochs"] == 4
    assert {"versions", "git_commit", "machine"} <= set(start)
    per_epoch = start["steps_per_epoch"]
    schedule = WarmupCosine(
        peak_lr=0.05 * 8 / 256, total_steps=4 * per_epoch, warmup_steps=per_epoch, end_lr=0.0
    )
    steps = [r for r in records if r["event"] == "step"]
    assert steps and all(r["lr"] == pytest.approx(schedule(r["step"] - 1)) for r in steps)
    end = records[-1]
    assert end["event"] == "end" and (end["epoch"], end["step"]) == (4, 4 * per_epoch)
    assert sorted(p.name for p in (out / "previews").iterdir())[-1] == "epoch-0004.png"
    assert (out / "model.safetensors").exists() and (out / "model.json").exists()


def test_scalars_and_previews_also_go_to_tensorboard(easy_data, tmp_path):
    """With the tensorboard extra (installed by `make test`), the JSONL numbers and the previews
    are TensorBoard events too, at their optimizer steps."""
    pytest.importorskip("tensorboard", reason="the [tensorboard] extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "board"
    run_pretrain(pretrain_config(easy_data["train"], out, epochs=2, max_steps_per_epoch=2))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    records = read_log(out / "log.jsonl")
    for event in ("step", "epoch"):
        logged = [(r["step"], r["loss"]) for r in records if r["event"] == event]
        board = [(e.step, e.value) for e in events.Scalars(f"{event}/loss")]
        assert [s for s, _ in board] == [s for s, _ in logged]
        assert [v for _, v in board] == pytest.approx([v for _, v in logged], rel=1e-6)
    assert "step/lr" in events.Tags()["scalars"]
    assert [e.step for e in events.Images("preview")] == [2, 4]


def test_resume_reproduces_the_uninterrupted_run(easy_data, tmp_path, monkeypatch):

    fast = {"max_steps_per_epoch": 2, "preview": False}
    full = run_pretrain(pretrain_config(easy_data["train"], tmp_path / "full", **fast))

    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
        stop_before_epoch(patch, 2)
        run_pretrain(pretrain_config(easy_data["train"], tmp_path / "cut", **fast))
    assert json.loads((tmp_path / "cut/checkpoints/pretrain/last.json").read_text())["epoch"] == 2
    resumed = run_pretrain(
        pretrain_config(easy_data["train"], tmp_path / "cut", resume=True, **fast)
    )

    assert resumed.state.step == full.state.step and resumed.state.epoch == 3
    a, b = weights_of(full.model_path), weights_of(resumed.model_path)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), (
        "resumed weights differ from the uninterrupted run"
    )
    # Also the optimizer moments and RNG streams: the final training states agree.
    state_a = torch.load(latest_checkpoint(tmp_path / "full", "pretrain")[1], weights_only=True)
    state_b = torch.load(latest_checkpoint(tmp_path / "cut", "pretrain")[1], weights_only=True)
    assert torch.equal(state_a["generators"][0], state_b["generators"][0])
    moments_a = state_a["optimizer"]["state"][0]["exp_avg"]
    assert torch.equal(moments_a, state_b["optimizer"]["state"][0]["exp_avg"])


def test_nonfinite_loss_stops_and_keeps_the_last_checkpoint(easy_data, tmp_path, monkeypatch):
    from vctmae.model import MaskedAutoencoder

    out = tmp_path / "nan"
    fast = {"max_steps_per_epoch": 2, "preview": False}
    # A 2-epoch run stopped after its first epoch (--resume refuses a changed --epochs).
    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
        stop_before_epoch(patch, 1)
        run_pretrain(pretrain_config(easy_data["train"], out, epochs=2, warmup_epochs=0, **fast))
    weights, _ = latest_checkpoint(out, "pretrain")
    before = weights_of(weights)

    clean = MaskedAutoencoder.forward_loss

    def poisoned(self, target, pred, mask):
        return clean(self, target, pred, mask) * torch.tensor(float("nan"))

    monkeypatch.setattr(MaskedAutoencoder, "forward_loss", poisoned)
    with pytest.raises(NonFiniteLossError) as caught:
        run_pretrain(
            pretrain_config(easy_data["train"], out, epochs=2, warmup_epochs=0, resume=True, **fast)
        )
    message = str(caught.value)
    assert "NaN/inf" in message and "epoch 2" in message and str(weights) in message
    assert latest_checkpoint(out, "pretrain")[0] == weights
    after = weights_of(weights)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(r["event"] == "nonfinite_loss" for r in read_log(out / "log.jsonl"))


# -- finetuning and evaluation -----------------------------------------------------------------


def test_finetuning_refuses_a_pretraining_file_with_another_input_normalisation(tmp_path):
    from vctmae.model import build_classifier, build_mae, load_init
    from vctmae.model.checkpoint import save_model

    path = save_model(build_mae("tiny", **SMALL_MODEL), tmp_path / "mae.safetensors")
    same = build_classifier("tiny", **SMALL_MODEL)
    report = load_init(same, path)
    assert "patch_embed.proj.weight" in report.loaded
    other = build_classifier("tiny", **SMALL_MODEL, input_std=0.3)
    with pytest.raises(ValueError, match=r"mae.safetensors: pretrained on inputs normalised"):
        load_init(other, path)


def test_finetuning_beats_chance_on_held_out_crops(easy_data, finetuned, tmp_path):
    assert finetuned.class_weights == [1.0, 1.0]  # balanced training split, read from manifest.csv
    assert finetuned.best_path.exists() and finetuned.state.best_metric is not None
    end = read_log(finetuned.log_path)[-1]
    assert end["event"] == "end" and end["epoch"] == finetuned.state.epoch
    assert (end["best_epoch"], end["best_val_f1"]) == (
        finetuned.state.best_epoch,
        finetuned.state.best_metric,
    )
    metrics = run_eval(
        eval_config(finetuned.best_path, easy_data["test"], tmp_path / "report", multiview=6)
    )
    assert metrics["n"] == 16
    assert metrics["accuracy"] >= 0.8 and metrics["f1"] >= 0.75 and metrics["roc_auc"] >= 0.85, (
        metrics
    )


def test_eval_metrics_equal_sklearn_on_written_predictions(easy_data, finetuned, tmp_path):
    reports = {}
    for views in (6, 1):
        out = tmp_path / f"mv{views}"
        metrics = run_eval(
            eval_config(finetuned.best_path, easy_data["test"], out, multiview=views)
        )
        predictions = read_predictions(out / "predictions.csv")
        assert len(predictions.keys) == len(set(predictions.keys)) == 16
        labels, probs = predictions.labels, predictions.probs
        predicted = (probs >= 0.5).astype(int)
        assert metrics["f1"] == pytest.approx(sk.f1_score(labels, predicted))
        assert metrics["accuracy"] == pytest.approx(sk.accuracy_score(labels, predicted))
        assert metrics["roc_auc"] == pytest.approx(sk.roc_auc_score(labels, probs), abs=1e-7)
        assert metrics["average_precision"] == pytest.approx(
            sk.average_precision_score(labels, probs), abs=1e-7
        )
        tn, fp, fn, tp = sk.confusion_matrix(labels, predicted).ravel()
        assert metrics["sensitivity"] == pytest.approx(tp / (tp + fn))
        assert metrics["specificity"] == pytest.approx(tn / (tn + fp))
        assert json.loads((out / "metrics.json").read_text())["multiview"] == views
        assert (out / "roc.png").stat().st_size > 0 and (out / "pr.png").stat().st_size > 0
        reports[views] = probs
    # Six views average different clips than the middle view alone.
    assert not np.allclose(reports[6], reports[1])


def test_compute_metrics_handles_a_single_class():
    metrics = compute_metrics(np.array([0, 0, 0]), np.array([0.1, 0.7, 0.2]))
    assert metrics["roc_auc"] is None and metrics["sensitivity"] is None
    assert metrics["specificity"] == pytest.approx(2 / 3)
    assert metrics["confusion_matrix"] == [[2, 1], [0, 0]]


def test_explain_writes_the_attention_picture(finetuned, tmp_path):
    import zarr

    from vctmae.clip import ClipRule
    from vctmae.infer.attention import explain_crop, rollout
    from vctmae.infer.config import ExplainConfig
    from vctmae.infer.explain import run_explain as explain
    from vctmae.model import load_model

    # Rollout of attention that only looks at itself is the identity.
    eye = torch.eye(5).expand(2, 5, 5)
    assert torch.allclose(rollout([eye, eye]), torch.eye(5, dtype=torch.float64))

    rng = np.random.default_rng(7)
    crops = np.stack([easy_crop(rng, 1), easy_crop(rng, 0)])
    store = zarr.open_group(str(tmp_path / "crops.zarr"), mode="w")
    store.create_array("crops", data=crops, chunks=(1, 96, 96, 96))
    store.create_array("classes", data=np.array([1, 0], dtype=np.int8))
    store.create_array("grades", data=np.array([2, 0], dtype=np.int8))
    store.attrs.update(keys=["a_L1", "b_L2"], splits=["test", "test"], levels=["L1", "L2"])

    model = load_model(finetuned.best_path)
    result = explain_crop(model, crops[0], ClipRule())
    assert result["frames"].shape == (16, 96, 96)
    assert result["slices"] == tuple(3 + 6 * k for k in range(16))  # the middle view, offset 3
    for heat in result["maps"].values():
        assert heat.shape == (16, 96, 96) and heat.min() >= 0 and heat.max() == pytest.approx(1.0)
    picture = tmp_path / "x.png"
    summary = explain(
        ExplainConfig(
            checkpoint=finetuned.best_path, zarr=tmp_path / "crops.zarr", key="a_L1", out=picture
        )
    )
    assert picture.stat().st_size > 10_000 and summary["label"] == 1
    assert summary["prob_multiview"] > 0.5  # a dense box: the finetuned model calls it a fracture
    with pytest.raises(KeyError):
        explain(
            ExplainConfig(
                checkpoint=finetuned.best_path,
                zarr=tmp_path / "crops.zarr",
                key="nope",
                out=picture,
            )
        )


# -- command line ------------------------------------------------------------------------------


def test_cli_takes_many_shard_paths_after_one_flag_and_fails_in_one_line(
    easy_data, finetuned, tmp_path
):
    from typer.testing import CliRunner

    from vctmae.cli import app

    runner = CliRunner()
    out = tmp_path / "cli"
    args = ["eval", "--checkpoint", str(finetuned.best_path), "--shards", *easy_data["test"],
            "--multiview", "1", "--workers", "0", "--device", "cpu", "--out", str(out)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(read_predictions(out / "predictions.csv").keys) == 16  # both shards were read
    missing = runner.invoke(app, ["eval", "--checkpoint", str(tmp_path / "none.safetensors"),
                                  "--shards", *easy_data["test"], "--out", str(out)])  # fmt: skip
    assert missing.exit_code == 1
    assert "none.safetensors: checkpoint not found" in missing.output


def test_cli_reports_a_shard_pattern_matching_nothing_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from vctmae.cli import app

    pattern = str(tmp_path / "nothing-*.tar")
    result = CliRunner().invoke(app, ["finetune", "--shards", pattern, "--model", "tiny",
                                      "--device", "cpu", "--out", str(tmp_path / "ft")])  # fmt: skip
    assert result.exit_code == 1
    assert f"{pattern}: glob matches no files" in result.output
    assert "Traceback" not in result.output


# -- distributed -------------------------------------------------------------------------------


def test_torchrun_two_cpu_processes(easy_data, tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(
        r"""
import json, os, sys
from pathlib import Path
import torch
from vctmae.data.loader import ShardLoader
from vctmae.data.options import LoaderOptions
from vctmae.infer.config import EvalConfig
from vctmae.infer.evaluate import run_eval
from vctmae.train.config import FinetuneConfig, RunOptions
from vctmae.train.finetune import run_finetune
from vctmae.model.checkpoint import save_model

train, test, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), Path(sys.argv[3])
rank = int(os.environ["RANK"])
seen = []
original_iter = ShardLoader.__iter__

def recording_iter(self):
    for batch in original_iter(self):
        if self.training:
            seen.extend(batch.keys)
        yield batch

ShardLoader.__iter__ = recording_iter
models = []
import vctmae.model as model_module
real_build = model_module.build_classifier

def keeping_build(*args, **kwargs):
    model = real_build(*args, **kwargs)
    models.append(model)
    return model

model_module.build_classifier = keeping_build
run = RunOptions(shards=tuple(train), out=out / "ft", model="tiny", model_overrides=json.loads(sys.argv[4]),
                 loader=LoaderOptions(workers=0), device="cpu", progress=False, log_every=1)
config = FinetuneConfig(run=run, epochs=2, warmup_epochs=1, batch_size=4, lr=1e-3, dropout=0.0)
result = run_finetune(config)
save_model(models[0], out / f"rank-{rank}.safetensors")
(out / f"seen-{rank}.json").write_text(json.dumps(seen))
run_eval(EvalConfig(checkpoint=result.best_path, shards=tuple(test), out=out / "eval", multiview=1,
                    loader=LoaderOptions(workers=0), device="cpu", progress=False, batch_size=3))
"""
    )
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(script), json.dumps(easy_data["train"]), json.dumps(easy_data["test"]), str(out),
               json.dumps(SMALL_MODEL)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]

    seen = [json.loads((out / f"seen-{r}.json").read_text()) for r in (0, 1)]
    assert seen[0] and seen[1]
    for r in (
        0,
        1,
    ):  # 2 epochs: each epoch a rank's keys are distinct, and disjoint from the other rank's
        half = len(seen[r]) // 2
        assert len(set(seen[r][:half])) == half
    first_epoch = [set(s[: len(s) // 2]) for s in seen]
    assert not first_epoch[0] & first_epoch[1]
    a, b = weights_of(out / "rank-0.safetensors"), weights_of(out / "rank-1.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "DDP ranks ended with different weights"
    predictions = read_predictions(out / "eval" / "predictions.csv")
    assert len(predictions.keys) == len(set(predictions.keys)) == 16
    log = read_log(out / "ft" / "log.jsonl")
    assert log[0]["world_size"] == 2


# -- on a GPU (skipped without one; run by benchmarks/gpu_check.sh) ------------------------------


@pytest.mark.cuda
def test_cuda_trainers_run_through_their_entry_points(easy_data, tmp_path):
    """Pretrain → finetune → eval on the GPU with the defaults there (bf16, Triton, fused Adam)."""
    pre = run_pretrain(
        pretrain_config(easy_data["train"], tmp_path / "pre", epochs=1, warmup_epochs=0,
                        device="cuda", preview=False)
    )  # fmt: skip
    assert all(math.isfinite(h["loss"]) for h in pre.state.history)
    run = RunOptions(
        shards=tuple(easy_data["train"]),
        out=tmp_path / "ft",
        init=pre.model_path,
        **{**TEST_RUN, "device": "cuda"},
    )
    result = run_finetune(
        FinetuneConfig(run=run, val_shards=tuple(easy_data["val"]), epochs=1, warmup_epochs=0,
                       batch_size=8, lr=1e-3, multiview=1)
    )  # fmt: skip
    metrics = run_eval(
        EvalConfig(checkpoint=result.best_path, shards=tuple(easy_data["test"]),
                   out=tmp_path / "report", loader=LoaderOptions(workers=0), device="cuda",
                   progress=False)
    )  # fmt: skip
    assert metrics["n"] == 16 and 0.0 <= metrics["accuracy"] <= 1.0


def test_finetune_validates_at_its_own_precision(easy_data, tmp_path, monkeypatch):
    """Validation computes at the run's --precision (an fp32 run never validates in bf16)."""
    import vctmae.train.finetune as finetune

    seen = []
    original = finetune.predict

    def recording(*args, **kwargs):
        seen.append(kwargs["precision"])
        return original(*args, **kwargs)

    monkeypatch.setattr(finetune, "predict", recording)
    speed = SpeedOptions(precision="bf16")
    run = RunOptions(shards=tuple(easy_data["train"]), out=tmp_path, **{**TEST_RUN, "speed": speed})
    run_finetune(FinetuneConfig(run=run, val_shards=tuple(easy_data["val"]), epochs=1,
                                warmup_epochs=0, batch_size=8, lr=1e-3, multiview=1))  # fmt: skip
    assert seen == ["bf16"]
