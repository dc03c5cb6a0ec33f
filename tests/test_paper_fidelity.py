"""The paper code's frame rule, context cut, flips, levels, multi-view combination and
224² format through the trainers and evaluation — and crop mode unchanged, bit for bit.

Independent sources: the numpy transcription of the reference's sampling and MONAI's crop/pad
(`test_clip_rules`), a transcription of the trainers' objectives and evaluation as they were
before `--frames`/`--flip` (main at 27895f3), explicit per-sample loops.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    TEST_RUN,
    assert_same_training,
    pretrain_config,
    run_options,
    run_steps,
    short_trainer,
    trainers,
    write_split,
)
from reference_code import (
    SMALL,
    mae_st_state,
    random_crops,
    reference_context_cut,
    reference_frames,
    reference_shift_range,
)

from vctmae.data.frames import FrameSampler
from vctmae.data.loader import ShardLoader
from vctmae.data.options import LoaderOptions
from vctmae.data.shards import ShardError
from vctmae.infer.views import multiview_probs
from vctmae.model import build_classifier, build_mae, load_mae_st
from vctmae.train.config import RunOptions

# ----------------------------------------------------------------------------- helpers


def random_boxes(rng: np.random.Generator, count: int, min_width: int = 14) -> np.ndarray:
    """JSON-style mask boxes (x0, x1, y0, y1, z0, z1), half-open, sagittal width >= min_width."""
    boxes = []
    for _ in range(count):
        width = int(rng.integers(min_width, 97))
        x0 = int(rng.integers(0, 96 - width + 1))
        y0 = int(rng.integers(0, 90))
        y1 = int(rng.integers(y0 + 1, 97))
        z0 = int(rng.integers(0, 60))
        boxes.append((x0, x0 + width, y0, y1, z0, int(rng.integers(z0 + 1, 97))))
    return np.asarray(boxes, dtype=np.int64)


def reference_view(crop: np.ndarray, box, shift: int) -> np.ndarray:
    """The reference's frames of one sample at one shift: its linspace rule over the mask's
    extent, then CropForegroundD + ResizeWithPadOrCropD (both transcribed in test_clip_rules)."""
    lo, width = int(box[0]), int(box[1] - box[0])
    frames = lo + reference_frames(width, shift)
    return reference_context_cut(crop[frames], tuple(int(v) for v in box), recentre=True)


def write_shard(path: Path, samples: list[dict]) -> None:
    """A shard whose samples carry the given JSON metadata (level, bbox) and a class (the
    metadata's "class", else 0)."""
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w") as tar:
        for meta in samples:
            buffer = io.BytesIO()
            np.save(buffer, rng.integers(-1000, 1000, (96, 96, 96), dtype=np.int16))
            members = {
                "crop.npy": buffer.getvalue(),
                "json": json.dumps(meta).encode(),
                "cls": str(meta.get("class", 0)).encode(),
            }
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{meta['key']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


# ----------------------------------------------------------------------------- crop mode, written out plainly


class PlainCropMaeObjective:
    """The crop-mode MAE objective written out plainly: offsets, then mirror flags, then mask
    noise, drawn in that order; the mirror reverses the whole crop."""

    def __init__(self, mask_ratio: float, num_tokens: int) -> None:
        self.mask_ratio, self.num_tokens = mask_ratio, num_tokens

    def draw(self, size, generator):
        return {
            "offsets": torch.randint(0, 6, (size,), generator=generator),
            "mirror": torch.rand(size, generator=generator) < 0.5,
            "noise": torch.rand(size, self.num_tokens, generator=generator),
        }

    def loss(self, module, batch, draws):
        crops = torch.where(draws["mirror"][:, None, None, None], batch.crops.flip(1), batch.crops)
        frames = draws["offsets"][:, None] + 6 * torch.arange(16)
        return module(crops, frames, mask_ratio=self.mask_ratio, noise=draws["noise"])[0]


class PlainCropClassifierObjective:
    def __init__(self, weights: torch.Tensor) -> None:
        self.weights = weights

    def draw(self, size, generator):
        return {
            "offsets": torch.randint(0, 6, (size,), generator=generator),
            "mirror": torch.rand(size, generator=generator) < 0.5,
        }

    def loss(self, module, batch, draws):
        crops = torch.where(draws["mirror"][:, None, None, None], batch.crops.flip(1), batch.crops)
        logits = module(crops, draws["offsets"][:, None] + 6 * torch.arange(16))
        return F.cross_entropy(logits.float(), batch.labels, weight=self.weights)


def final_weights(trainer) -> dict[str, torch.Tensor]:
    trainer.start()
    trainer.fit()
    trainer.run.log.close()
    return {k: v.clone() for k, v in trainer.run.model.state_dict().items()}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("fidelity")
    return [str(p) for p in write_split(root, "train", 16, seed=4)]


def test_crop_mode_training_equals_the_plain_crop_objectives_bit_for_bit(labelled, tmp_path):
    from vctmae.train.pretrain import pretrain_trainer

    def pretrainer(out):
        config = pretrain_config(
            labelled, out, epochs=2, max_steps_per_epoch=2, preview=False, flip="frames"
        )
        return pretrain_trainer(config)

    new = final_weights(pretrainer(tmp_path / "new"))
    plain = pretrainer(tmp_path / "plain")
    plain.objective = PlainCropMaeObjective(0.8, plain.run.model.config.num_tokens)
    plain_weights = final_weights(plain)
    assert new.keys() == plain_weights.keys()
    assert all(torch.equal(new[k], plain_weights[k]) for k in new), "crop-mode pretraining changed"

    def finetuner(out):
        run = RunOptions(
            shards=tuple(labelled), out=out, flip="frames", max_steps_per_epoch=2, **TEST_RUN
        )
        return short_trainer("finetune", run)

    new = final_weights(finetuner(tmp_path / "ft-new"))
    plain = finetuner(tmp_path / "ft-plain")
    plain.objective = PlainCropClassifierObjective(plain.objective.class_weights)
    plain_weights = final_weights(plain)
    assert all(torch.equal(new[k], plain_weights[k]) for k in new), "crop-mode finetuning changed"


@torch.no_grad()
def plain_offset_ensemble(model, crops, views: int) -> torch.Tensor:
    """Crop-mode evaluation written out plainly: the mean softmax over offsets 0..5 (or 3)."""
    offsets = list(range(6)) if views == 6 else [3]
    mean = torch.zeros(crops.shape[0])
    for offset in offsets:
        frames = torch.full((crops.shape[0],), offset)[:, None] + 6 * torch.arange(16)
        mean += torch.softmax(model(crops, frames).float(), dim=-1)[:, 1]
    return mean / len(offsets)


@pytest.mark.parametrize("views", [6, 1])
def test_crop_mode_evaluation_equals_the_plain_offset_ensemble_bit_for_bit(views):
    torch.manual_seed(3)
    model = build_classifier("tiny", **SMALL).eval()
    crops = random_crops(3, seed=5, high=1500)
    new = multiview_probs(model, crops, views=views, device=torch.device("cpu"))
    assert torch.equal(new, plain_offset_ensemble(model, crops, views))


# ----------------------------------------------------------------------------- mask mode


def test_mask_mode_training_input_is_the_reference_sampling_and_cut():
    rng = np.random.default_rng(8)
    crops = random_crops(10, seed=9, high=1500)
    boxes = random_boxes(rng, 10)
    sampler = FrameSampler(mode="mask")
    draws = sampler.draw(10, torch.Generator().manual_seed(1))
    clips, local = sampler.model_input(crops, torch.from_numpy(boxes), draws)
    assert clips.dtype == torch.int16 and clips.shape == (10, 16, 96, 96)
    assert torch.equal(local, torch.arange(16).expand(10, -1))
    for b in range(10):
        shifts = reference_shift_range(int(boxes[b, 1] - boxes[b, 0]))
        shift = shifts[int(float(draws["uniform"][b]) * len(shifts))]
        expected = reference_view(crops[b].numpy(), boxes[b], shift)
        assert np.array_equal(clips[b].numpy(), expected), b


def test_flips_rows_after_the_cut_and_frames_as_a_mirrored_crop():
    rng = np.random.default_rng(12)
    crops = random_crops(6, seed=13, high=1500)
    boxes = torch.from_numpy(random_boxes(rng, 6))
    draws = FrameSampler(mode="mask", flip="rows").draw(6, torch.Generator().manual_seed(2))
    flags = draws["flip"]
    assert flags.any() and not flags.all()
    plain, _ = FrameSampler(mode="mask").model_input(crops, boxes, draws)
    rows, _ = FrameSampler(mode="mask", flip="rows").model_input(crops, boxes, draws)
    for b in range(6):
        expected = plain[b].flip(1) if flags[b] else plain[b]  # rows of each (H, W) frame
        assert torch.equal(rows[b], expected)
    # --flip frames: the view the left-right mirrored crop (and mask) would give.
    mirrored, _ = FrameSampler(mode="mask", flip="frames").model_input(crops, boxes, draws)
    flipped_boxes = boxes.clone()
    flipped_boxes[:, 0], flipped_boxes[:, 1] = 96 - boxes[:, 1], 96 - boxes[:, 0]
    on_flipped, _ = FrameSampler(mode="mask").model_input(crops.flip(1), flipped_boxes, draws)
    for b in range(6):
        assert torch.equal(mirrored[b], on_flipped[b] if flags[b] else plain[b])
    # Crop mode with a row flip: o + 6k, rows reversed where flagged.
    crop_draws = FrameSampler(flip="rows").draw(6, torch.Generator().manual_seed(2))
    clips, _ = FrameSampler(flip="rows").model_input(crops, None, crop_draws)
    for b in range(6):
        frames = crops[b, int(crop_draws["offsets"][b]) :: 6]
        assert torch.equal(clips[b], frames.flip(1) if crop_draws["flip"][b] else frames)


@pytest.mark.parametrize("combine", ["probs", "logits"])
def test_mask_mode_evaluation_averages_each_samples_own_views(combine):
    torch.manual_seed(4)
    model = build_classifier("tiny", **SMALL).eval()
    rng = np.random.default_rng(21)
    crops = random_crops(4, seed=22, high=1500)
    boxes = random_boxes(rng, 4)
    boxes[0, :2] = (10, 28)  # 18 slices wide: sd = 1 → 1 view
    boxes[1, :2] = (0, 96)  # the whole crop: sd = 5 → 5 views
    got = multiview_probs(
        model, crops, views=6, device=torch.device("cpu"), frames="mask",
        boxes=torch.from_numpy(boxes), combine=combine,
    )  # fmt: skip
    view_counts = set()
    for b in range(4):
        shifts = reference_shift_range(int(boxes[b, 1] - boxes[b, 0]))
        view_counts.add(len(shifts))
        clips = torch.from_numpy(
            np.stack([reference_view(crops[b].numpy(), boxes[b], s) for s in shifts])
        )
        logits = model(clips, torch.arange(16).expand(len(shifts), -1)).float()  # (V, 2)
        if combine == "probs":
            expected = torch.softmax(logits, -1)[:, 1].mean()
        else:
            expected = torch.softmax(logits.mean(0), -1)[1]
        torch.testing.assert_close(got[b], expected, rtol=1e-5, atol=1e-6)
    assert len(view_counts) > 1  # samples with different numbers of views in one batch


def test_combine_logits_in_crop_mode_is_softmax_of_mean_logits():
    torch.manual_seed(6)
    model = build_classifier("tiny", **SMALL).eval()
    crops = random_crops(2, seed=7, high=1500)
    got = multiview_probs(model, crops, views=6, device=torch.device("cpu"), combine="logits")
    logits = torch.stack(
        [model(crops, o + 6 * torch.arange(16).expand(2, -1)).float() for o in range(6)]
    )  # (6, B, 2)
    torch.testing.assert_close(got, torch.softmax(logits.mean(0), -1)[:, 1], rtol=1e-6, atol=0)
    probs = multiview_probs(model, crops, views=6, device=torch.device("cpu"))
    assert not torch.allclose(got, probs, rtol=0, atol=1e-7)  # the two rules differ


@pytest.fixture(scope="module")
def boxed_shards(tmp_path_factory) -> list[str]:
    """Labelled shards in ingest's format with random mask boxes (for mask-mode trainers)."""
    root = tmp_path_factory.mktemp("boxed")
    boxes = random_boxes(np.random.default_rng(30), 16)
    samples = [
        {"key": f"b{i:02d}_L1", "level": "L1", "bbox": boxes[i].tolist(), "class": i % 2}
        for i in range(16)
    ]
    write_shard(root / "train-000000.tar", samples)
    return [str(root / "train-000000.tar")]


@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_mask_mode_static_step_equals_the_eager_step_and_compiles_whole(
    boxed_shards, tmp_path, monkeypatch, kind
):
    """The capture-ready step (vctmae.train.graph) in mask mode with the row flip: the boxes
    travel through its slots, and forward + backward trace as one graph (no host sync in the
    frame rule, the context cut or the flip), as a CUDA graph needs."""
    import torch._dynamo

    def make(name):
        return short_trainer(
            kind, run_options(boxed_shards, tmp_path / name, frames="mask", flip="rows")
        )

    eager, static = trainers(make, monkeypatch)
    assert_same_training(eager, static, run_steps(eager, 3, 1), run_steps(static, 3, 1))
    batches, _ = static.graphed.static_args
    assert batches[0].boxes is not None
    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(static.forward_backward, fullgraph=True, backend="aot_eager")
        compiled(*static.graphed.static_args)


# ----------------------------------------------------------------------------- shards: boxes, levels


def test_loader_carries_each_samples_box_and_filters_levels(tmp_path):
    rng = np.random.default_rng(3)
    levels = ["C7", "T1", "T12", "T13", "L1", "L6", "T5", "L3"]
    boxes = random_boxes(rng, len(levels))
    samples = [
        {"key": f"case-{i}_{level}", "level": level, "bbox": boxes[i].tolist()}
        for i, level in enumerate(levels)
    ]
    shard = tmp_path / "train-000000.tar"
    write_shard(shard, samples)
    by_key = {s["key"]: s for s in samples}
    for workers in (0, 2):
        options = LoaderOptions(workers=workers, levels="T1-T12,L1-L6")
        loader = options.build(
            [str(shard)], batch_size=3, training=False, device=torch.device("cpu")
        )
        seen = {}
        for batch in loader:
            for key, box in zip(batch.keys, batch.boxes.tolist(), strict=True):
                seen[key] = box
        assert sorted(seen) == sorted(
            k for k, s in by_key.items() if s["level"] not in ("C7", "T13")
        )
        assert all(seen[key] == by_key[key]["bbox"] for key in seen)
        assert loader.dropped_levels == 2
    everything = LoaderOptions(workers=0).build(
        [str(shard)], batch_size=3, training=False, device=torch.device("cpu")
    )
    assert everything.num_samples == len(levels)


def test_metadata_the_rules_need_is_checked(tmp_path):
    from vctmae.data.shards import check_boxes

    shard = tmp_path / "old-000000.tar"
    write_shard(shard, [{"key": "a_L1"}, {"key": "b_L2", "level": "L2"}])
    with pytest.raises(ShardError, match="without a `level`.*--levels all"):
        ShardLoader(str(shard), batch_size=1, training=False, device="cpu", num_workers=0,
                    levels=frozenset({"L1"}))  # fmt: skip
    loader = ShardLoader(str(shard), batch_size=1, training=False, device="cpu", num_workers=0)
    with pytest.raises(ShardError, match="without a mask `bbox`.*--frames mask"):
        check_boxes(loader.indexes)
    bad = tmp_path / "bad-000000.tar"
    write_shard(bad, [{"key": "a_L1", "level": "L1", "bbox": [5, 2, 0, 1, 0, 1]}])
    with pytest.raises(ShardError, match="bbox"):
        ShardLoader(str(bad), batch_size=1, training=False, device="cpu", num_workers=0)
    from vctmae.errors import UsageError

    with pytest.raises(UsageError, match="--levels"):
        LoaderOptions(levels="T3-T1")


# ----------------------------------------------------------------------------- 224² frames


def test_frame_size_224_pads_the_slices_and_keeps_the_video_table(tmp_path):
    config = RunOptions(shards=("x.tar",), out=tmp_path / "o", model="tiny", frame_size=224)
    assert config.model_fields()["img"] == 224
    torch.manual_seed(2)
    model = build_classifier("tiny", img=224, **SMALL).eval()
    assert model.config.num_tokens == 8 * 14 * 14
    crops = random_crops(2, seed=3, high=1500)
    frames = torch.tensor([[3 + 6 * k for k in range(16)], [5 * k for k in range(16)]])
    tokens = model.embed(crops, frames)  # (B, 1568, D)
    # Independently: the scaled frames padded centred with 0 (= −1000 HU) to 224², a Conv3d.
    clips = (crops[torch.arange(2)[:, None], frames].float().clamp(-1000, 1000) + 1000) / 2000
    padded = F.pad(clips, (64, 64, 64, 64))[:, None]  # (B, 1, 16, 224, 224)
    weight = model.patch_embed.proj.weight.sum(1, keepdim=True)
    expected = F.conv3d(padded, weight, model.patch_embed.proj.bias, stride=(2, 16, 16))
    expected = expected.flatten(2).transpose(1, 2) + model.patch_pos_embed()
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)
    # A 224² video checkpoint's positional tables load whole (no cropping).
    state = mae_st_state(side=14, seed=4)
    mae = build_mae("tiny", img=224, **SMALL)
    report = load_mae_st(state, mae, pos_init="crop")
    assert "pos_embed_spatial" not in report.cropped and report.missing == []
    assert torch.equal(mae.pos_embed_spatial.detach(), state["pos_embed_spatial"])
    loss, pred, mask = mae(crops, frames, mask_ratio=0.9)
    assert pred.shape == (2, 1568, mae.config.pred_dim) and torch.isfinite(loss)


# ----------------------------------------------------------------------------- flags


def test_norm_pix_loss_reaches_the_pretraining_model(labelled, tmp_path):
    from vctmae.train.pretrain import pretrain_trainer

    trainer = pretrain_trainer(
        pretrain_config(labelled, tmp_path / "n", norm_pix_loss=True, preview=False)
    )
    assert trainer.run.model.config.norm_pix_loss is True
    trainer.run.log.close()
    plain = pretrain_trainer(pretrain_config(labelled, tmp_path / "p", preview=False))
    assert plain.run.model.config.norm_pix_loss is False
    plain.run.log.close()


def test_clip_rule_flags_are_on_the_commands_with_help():
    from typer.testing import CliRunner

    from vctmae.cli import app

    def help_text(command: str) -> str:
        result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "400"})
        assert result.exit_code == 0, result.output
        return " ".join(result.output.split())

    pretrain, finetune, evaluate = (help_text(c) for c in ("pretrain", "finetune", "eval"))
    for text in (pretrain, finetune):
        for flag in ("--frames", "--flip", "--frame-size", "--levels"):
            assert flag in text
        assert "the reference code's pretraining flip" in text
        assert "--mirror" not in text
    assert "--norm-pix-loss" in pretrain and "--norm-pix-loss" not in finetune
    for text in (pretrain, finetune, evaluate):
        # One help text says each command's default levels.
        assert "Default: pretrain all" in text and "finetune T1-T12,L1-L6" in text
    for text in (finetune, evaluate):
        assert "--combine" in text and "what the reference code does" in text
    assert "--frames" in evaluate and "the rule the checkpoint was finetuned with" in evaluate
