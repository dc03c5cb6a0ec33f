"""The 3-D MAE baseline (paper Table 3, "3D MAE"): presets `mae3d-*`.

The model reads the whole int16 crop in 16³ cubes (216 tokens) with fixed 3-D sin-cos
positions; here its parts are checked against plain hand computations (the cube unfolding, the
sin-cos formula), a short pretraining run on easy synthetic shards must lower its loss, the
pretrained encoder must load into the classifier key for key, the commands must run through
the command line, and what a 3-D model cannot do must be refused in one line.
"""

from __future__ import annotations

import json
import math
import types
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import SMALL_MODEL, cli, one_line_error, pretrain_config, train_val_thin_shards
from reference_code import mae_st_state, random_crops

from vctmae.data.frames import FrameSampler, check_crop_shape
from vctmae.data.shards import ShardError
from vctmae.errors import UsageError
from vctmae.model import (
    CheckpointError,
    ModelConfig,
    build_classifier,
    build_mae,
    load_init,
    load_mae_st,
    load_model,
    preset_config,
    save_model,
    visible_count,
)
from vctmae.model.vit import VolumePatchEmbed, sincos_positions
from vctmae.train.pretrain import run_pretrain

NO_FRAMES = torch.zeros(2, 0, dtype=torch.long)


def hand_volume(crops: torch.Tensor) -> torch.Tensor:
    """HU → [0, 1] of whole crops (B, 96, 96, 96), written out: clip to ±1000, shift, scale."""
    return (crops.double().clamp(-1000, 1000) + 1000) / 2000


def hand_cubes(volume: torch.Tensor) -> torch.Tensor:
    """(B, 96, 96, 96) → (B, 216, 4096): cube (s, r, c) at token s·36 + r·6 + c, its voxels in
    (depth, row, column) order, by explicit slicing."""
    batch = volume.shape[0]
    out = torch.empty(batch, 216, 4096, dtype=volume.dtype)
    for s in range(6):
        for r in range(6):
            for c in range(6):
                cube = volume[:, 16 * s : 16 * s + 16, 16 * r : 16 * r + 16, 16 * c : 16 * c + 16]
                out[:, s * 36 + r * 6 + c] = cube.reshape(batch, -1)
    return out


@pytest.fixture
def small_mae3d(monkeypatch):
    """`--model mae3d-tiny` builds the 3-D model at the shrunken test widths (48 wide, 2 blocks)."""
    from vctmae.model import config as model_config

    small = model_config.preset_config("mae3d-tiny", **SMALL_MODEL)
    monkeypatch.setitem(model_config.PRESETS, "mae3d-tiny", small)
    monkeypatch.setattr("vctmae.runlog.RunLog.image", lambda *args, **kwargs: None)
    return small


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, list[str]]:
    return train_val_thin_shards(tmp_path_factory.mktemp("mae3d"), np.random.default_rng(11))


# ----------------------------------------------------------------------------------------------
# Shapes, masking, the patch embedding and the positions


def test_216_tokens_masking_loss_and_logits_on_fresh_crops():
    torch.manual_seed(0)
    mae = build_mae("mae3d-tiny", **SMALL_MODEL)
    assert mae.config.volume and mae.config.grid == (6, 6, 6) and mae.config.num_tokens == 216
    assert tuple(mae.patch_embed.proj.weight.shape) == (48, 1, 16, 16, 16)
    crops = random_crops(2, seed=3)
    noise = torch.rand(2, 216)
    latent, mask, _ = mae.forward_encoder(crops, NO_FRAMES, 0.75, noise)
    assert visible_count(216, 0.75) == 54 and latent.shape == (2, 54, 48)
    assert mask.shape == (2, 216) and mask.sum(1).tolist() == [162.0, 162.0]
    # The visible tokens are the 54 of least noise.
    kept = noise.argsort(1)[:, :54]
    assert all(
        set(kept[b].tolist()) == set((mask[b] == 0).nonzero()[:, 0].tolist()) for b in (0, 1)
    )
    loss, pred, mask = mae(crops, NO_FRAMES, mask_ratio=0.8)
    assert torch.isfinite(loss) and pred.shape == (2, 216, 4096)
    assert mask.sum(1).tolist() == [216 - visible_count(216, 0.8)] * 2
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in mae.parameters() if p.grad is not None)

    classifier = build_classifier("mae3d-tiny", num_classes=2, **SMALL_MODEL)
    logits = classifier(random_crops(2, seed=4), NO_FRAMES)
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


def test_base_preset_is_a_vit_b_on_16_cubed_cubes():
    config = preset_config("mae3d-base")
    assert (config.embed_dim, config.depth, config.num_heads) == (768, 12, 12)
    assert (config.decoder_embed_dim, config.decoder_depth) == (512, 8)
    assert config.num_tokens == 216 and config.pred_dim == 16**3
    with torch.device("meta"):
        mae = build_mae("mae3d-base")
    encoder = sum(
        p.numel() for n, p in mae.named_parameters() if not n.startswith(("decoder", "mask"))
    )
    assert 85e6 < encoder < 90e6


@pytest.mark.parametrize(("mean", "std", "tolerance"), [(0.0, 1.0, 1e-5), (0.5, 0.1, 1e-4)])
def test_patch_embedding_equals_unfolded_cubes_times_the_kernel(mean, std, tolerance):
    """The paper's [0, 1] input to 1e-5; mae3d-tiny's (x − 0.5) / 0.1, folded into the kernel's
    bias (b − 5·ΣW over 4096 voxels: float32 cancellation), to 1e-4."""
    torch.manual_seed(1)
    mae = build_mae("mae3d-tiny", **SMALL_MODEL, input_mean=mean, input_std=std)
    crops = random_crops(2, seed=5)
    tokens = mae.patch_embed(crops, NO_FRAMES, torch.zeros(1, 216, 48))  # (B, 216, 48)
    weight = mae.patch_embed.proj.weight.double().reshape(48, 4096)
    bias = mae.patch_embed.proj.bias.double()
    cubes = (hand_cubes(hand_volume(crops)) - mean) / std  # (B, 216, 4096)
    expected = cubes @ weight.T + bias
    torch.testing.assert_close(tokens.double(), expected, rtol=tolerance, atol=tolerance)
    # The target is the same cubes, normalised, one value per voxel.
    torch.testing.assert_close(mae.target(crops, NO_FRAMES).double(), cubes, rtol=1e-6, atol=1e-6)


def test_positions_are_fixed_3d_sincos():
    mae = build_mae("mae3d-tiny", **SMALL_MODEL)
    table = mae.patch_pos_embed()[0]  # (216, 48): 16 dims per axis, 8 frequencies each
    for s, r, c in [(0, 0, 0), (5, 2, 3), (1, 4, 0)]:
        token = s * 36 + r * 6 + c
        expected = []
        for index in (s, r, c):
            frequencies = [10000 ** (-k / 8) for k in range(8)]
            expected += [math.sin(index * w) for w in frequencies]
            expected += [math.cos(index * w) for w in frequencies]
        torch.testing.assert_close(table[token], torch.tensor(expected), rtol=0, atol=1e-6)
    assert len({tuple(row) for row in table.tolist()}) == 216
    # Uneven widths: 512 = 170 + 170 + 172 (the decoder of mae3d-base).
    wide = sincos_positions((6, 6, 6), 512)[0]
    assert wide.shape == (216, 512) and torch.equal(wide[0, 170:255], torch.zeros(85))
    # Token 215 = (5, 5, 5); the column part starts at 340: 86 sines, then cos(5·ω_0) = cos 5.
    assert wide[215, 340 + 86] == pytest.approx(math.cos(5.0))
    # Fixed: not parameters, not in the weights; the decoder has its own table of its width.
    names = {n for n, _ in mae.named_parameters()}
    assert not any("pos_embed" in n for n in names)
    assert not any("pos_embed" in k for k in mae.state_dict())
    assert mae.decoder_pos_embed.shape == (1, 216, 32) and not mae.decoder_pos_embed.requires_grad


def test_volume_config_round_trips_and_is_validated(tmp_path):
    torch.manual_seed(2)
    mae = build_mae("mae3d-tiny", **SMALL_MODEL).eval()
    path = save_model(mae, tmp_path / "m.safetensors")
    assert json.loads((tmp_path / "m.json").read_text())["config"]["input_kind"] == "volume"
    loaded = load_model(path).eval()
    assert loaded.config == mae.config and isinstance(loaded.patch_embed, VolumePatchEmbed)
    noise = torch.rand(1, 216)
    crops = random_crops(1, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(crops, NO_FRAMES[:1], noise=noise)[1], mae(crops, NO_FRAMES[:1], noise=noise)[1]
        )
    with pytest.raises(ValueError, match="t_patch == patch"):
        preset_config("mae3d-tiny", t_patch=2)
    with pytest.raises(ValueError, match="input_kind"):
        preset_config("tiny", input_kind="cube")
    # A config written before `input_kind` existed is a video model.
    old = {k: v for k, v in preset_config("tiny").to_dict().items() if k != "input_kind"}
    assert not ModelConfig.from_dict(old).volume


# ----------------------------------------------------------------------------------------------
# Flips and views


@pytest.mark.parametrize(("flip", "axis"), [("rows", 2), ("frames", 1)])
def test_flips_reverse_the_corresponding_axis_of_the_crop(flip, axis):
    sampler = FrameSampler(flip=flip, volume=True)
    crops = random_crops(4, seed=7)
    draws = sampler.draw(4, torch.Generator().manual_seed(0))
    assert set(draws) == {"flip"}
    draws["flip"] = torch.tensor([True, False, True, False])
    given, frames = sampler.model_input(crops, None, draws)
    assert frames.shape == (4, 0)
    for b in range(4):
        expected = crops[b].flip(axis - 1) if draws["flip"][b] else crops[b]
        assert torch.equal(given[b], expected), b
    assert FrameSampler(volume=True).draw(3, torch.Generator()) == {}


def test_a_3d_model_sees_one_view_whatever_multiview_asks():
    from vctmae.infer.views import multiview_probs

    torch.manual_seed(3)
    classifier = build_classifier("mae3d-tiny", **SMALL_MODEL).eval()
    crops = random_crops(3, seed=8)
    shifts, valid = FrameSampler(volume=True).view_table(crops, None, 6)
    assert shifts.shape == (3, 1) and valid.all()
    six = multiview_probs(classifier, crops, views=6, device=torch.device("cpu"))
    with torch.no_grad():
        direct = torch.softmax(classifier(crops, torch.zeros(3, 0, dtype=torch.long)), -1)[:, 1]
    torch.testing.assert_close(six, direct)


# ----------------------------------------------------------------------------------------------
# Training: pretraining lowers the loss; the encoder goes into the classifier


def test_pretraining_lowers_the_loss_and_its_encoder_initialises_the_classifier(shards, tmp_path):
    out = tmp_path / "pre"
    raw = {**SMALL_MODEL, "input_mean": 0.0, "input_std": 1.0}
    # --flip frames (pretrain_config's default here): the 3-D flip runs in the step.
    config = pretrain_config(
        shards["train"], out, model="mae3d-tiny", model_overrides=raw, epochs=4
    )
    assert config.run.flip == "frames"
    result = run_pretrain(config)
    losses = [h["loss"] for h in result.state.history]
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0], losses
    assert sorted(p.name for p in (out / "previews").iterdir())[-1] == "epoch-0004.png"

    mae = load_model(out / "model.safetensors")
    classifier = build_classifier("mae3d-tiny", **raw)
    report = load_init(classifier, out / "model.safetensors")
    encoder = sorted(k for k in classifier.state_dict() if not k.startswith("head."))
    assert report.loaded == encoder and report.missing == ["head.weight", "head.bias"]
    assert all(torch.equal(classifier.state_dict()[k], mae.state_dict()[k]) for k in encoder)
    assert set(report.unexpected) == {
        k for k in mae.state_dict() if k.startswith("decoder") or k == "mask_token"
    }


def test_the_three_commands_run_and_eval_is_one_view(shards, small_mae3d, tmp_path):
    common = ["--model", "mae3d-tiny", "--epochs", 1, "--warmup-epochs", 0, "--batch-size", 8,
              "--workers", 0, "--device", "cpu", "--no-progress"]  # fmt: skip
    result = cli("pretrain", "--shards", *shards["train"], *common, "--mask-ratio", 0.75,
                 "--flip", "rows", "--no-preview", "--out", tmp_path / "pre")  # fmt: skip
    assert result.exit_code == 0, result.output
    weights = tmp_path / "pre" / "model.safetensors"
    result = cli("finetune", "--shards", *shards["train"], "--val-shards", *shards["val"],
                 *common, "--init", weights, "--out", tmp_path / "ft")  # fmt: skip
    assert result.exit_code == 0, result.output
    result = cli("finetune", "--shards", *shards["train"], *common, "--out", tmp_path / "scratch")
    assert result.exit_code == 0, result.output  # the random-init row
    best = tmp_path / "ft" / "best.safetensors"
    probs = {}
    for views in (6, 1):
        out = tmp_path / f"eval{views}"
        result = cli("eval", "--checkpoint", best, "--shards", *shards["val"],
                     "--multiview", views, "--workers", 0, "--device", "cpu", "--no-progress",
                     "--out", out)  # fmt: skip
        assert result.exit_code == 0, result.output
        probs[views] = (out / "predictions.csv").read_text()
    assert probs[6] == probs[1]


# ----------------------------------------------------------------------------------------------
# Refusals


def test_video_weights_into_a_3d_model_are_refused_naming_both(tmp_path):
    volume = build_classifier("mae3d-tiny", **SMALL_MODEL)
    kinetics = tmp_path / "k700.pth"
    torch.save({"model_state": mae_st_state(dim=48, depth=2, decoder_dim=32, side=14)}, kinetics)
    for load in (lambda: load_init(volume, kinetics), lambda: load_mae_st(kinetics, volume)):
        with pytest.raises(CheckpointError, match=r"k700\.pth: a video checkpoint .* 3-D model"):
            load()
    video = save_model(build_mae("tiny", **SMALL_MODEL), tmp_path / "video.safetensors")
    with pytest.raises(CheckpointError) as error:
        load_init(volume, video)
    message = str(error.value)
    assert "video.safetensors" in message and "a video model (16 frames" in message
    assert "a 3-D model (96×96×96 volume, 16³ cubes → 216 tokens)" in message
    cube = save_model(build_mae("mae3d-tiny", **SMALL_MODEL), tmp_path / "cube.safetensors")
    with pytest.raises(CheckpointError, match=r"cube\.safetensors: weights of a 3-D model"):
        load_init(build_classifier("tiny", **SMALL_MODEL), cube)


def test_frame_flags_triton_and_thin_crops_are_refused_in_one_line(shards, small_mae3d, tmp_path):
    def pretrain(data, *extra):
        return cli("pretrain", "--shards", *data, "--model", "mae3d-tiny", "--epochs", 1,
                   "--warmup-epochs", 0, "--workers", 0, "--device", "cpu", "--no-progress",
                   "--out", tmp_path / "pre", *extra)  # fmt: skip

    train = shards["train"]
    one_line_error(pretrain(train, "--frames", "mask"), 2, "--frames mask", "--model mae3d-tiny")
    one_line_error(pretrain(train, "--frame-size", 224), 2, "--frame-size 224", "3-D model")
    one_line_error(pretrain(train, "--patch-embed", "triton"), 2, "--patch-embed triton")
    one_line_error(pretrain(shards["thin"]), 1, shards["thin"][0], "reads the whole crop")
    with pytest.raises(ShardError, match=r"expects \(96, 96, 96\)"):
        thin = types.SimpleNamespace(shape=(96, 96, 64), path="x.tar")
        check_crop_shape(thin, preset_config("mae3d-tiny"))

    classifier = save_model(
        build_classifier("mae3d-tiny", **SMALL_MODEL), tmp_path / "c.safetensors"
    )
    result = cli("eval", "--checkpoint", classifier, "--shards", *shards["val"], "--frames", "mask",
                 "--workers", 0, "--device", "cpu", "--out", tmp_path / "report")  # fmt: skip
    one_line_error(result, 2, "--frames mask", str(classifier), "3-D model")
    result = cli("explain", "--checkpoint", classifier, "--zarr", tmp_path / "crops.zarr",
                 "--key", "x_L1", "--out", tmp_path / "x.png")  # fmt: skip
    one_line_error(result, 2, str(classifier), "video model's 16 frames")


def test_cuda_graph_capture_falls_back_for_a_3d_model_with_its_reason(shards, tmp_path):
    from vctmae.train.config import RunOptions
    from vctmae.train.run import capture_blocker

    cuda = SimpleNamespace(device=torch.device("cuda"), enabled=False)
    video = RunOptions(shards=tuple(shards["train"]), out=tmp_path, model="tiny")
    assert capture_blocker(video, cuda) is None
    volume = RunOptions(shards=tuple(shards["train"]), out=tmp_path, model="mae3d-tiny")
    assert "3-D model" in capture_blocker(volume, cuda)


def test_the_3d_model_keeps_its_torch_patch_embedding():
    from vctmae.infer.device import install_patch_embed

    model = build_classifier("mae3d-tiny", **SMALL_MODEL)
    embed = model.patch_embed
    assert install_patch_embed(model, "auto", torch.device("cuda")) == "torch"
    assert model.patch_embed is embed
    with pytest.raises(UsageError, match="--patch-embed triton"):
        install_patch_embed(model, "triton", torch.device("cuda"))


def test_predict_runs_a_3d_classifier_and_refuses_its_attention(tmp_path):
    from vctmae.predict.config import PredictConfig
    from vctmae.predict.run import run_predict
    from vctmae.synth import SynthConfig
    from vctmae.synth.phantoms import write_phantoms

    write_phantoms(SynthConfig(out=tmp_path / "raw", cases=1, seed=3))
    torch.manual_seed(4)
    weights = save_model(build_classifier("mae3d-tiny", **SMALL_MODEL), tmp_path / "c.safetensors")
    base = dict(checkpoint=weights, src=tmp_path / "raw", device="cpu", progress=False)
    with pytest.raises(UsageError, match=r"c\.safetensors: attention pictures .*--no-attention"):
        run_predict(PredictConfig(out=tmp_path / "refused", **base))
    assert not (tmp_path / "refused").exists()
    result = run_predict(PredictConfig(out=tmp_path / "report", attention=False, **base))
    [scan] = result.scans
    probs = [v.prob_fracture for v in scan.vertebrae]
    assert scan.ok and probs and all(0.0 < p < 1.0 for p in probs)


def test_the_preview_follows_the_models_token_grid(tmp_path):
    """One picture column per token layer: the 3-D model's six, a 224² video model's 8 × 14 × 14
    grid (a fixed 8 × 6 × 6 grid could not draw Table 2 row 5's previews)."""
    from PIL import Image

    from vctmae.train.pretrain import write_preview

    crop = random_crops(1, seed=9)
    sizes = {}
    for name, model in {
        "mae3d": build_mae("mae3d-tiny", **SMALL_MODEL),
        "video224": build_mae("tiny", **SMALL_MODEL, img=224),
    }.items():
        path = write_preview(
            model, crop, tmp_path / f"{name}.png", mask_ratio=0.75, seed=0, title=name
        )
        sizes[name] = Image.open(path).size
    # Columns are 1.6 inches wide at 80 dpi: 6 for the 3-D model, 8 for the video model.
    assert sizes["mae3d"][0] == round(1.6 * 6 * 80) and sizes["video224"][0] == round(1.6 * 8 * 80)
