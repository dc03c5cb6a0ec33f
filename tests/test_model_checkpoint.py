"""The foreign-weight adapter (mae_st / PySlowFast layouts, positional cropping) and own safetensors."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch
import torch.nn.functional as F
from reference_code import (
    SMALL,
    crop_clip,
    mae_st_state,
    random_crops,
    random_frames,
    reference_mae,
    to_pyslowfast,
)

from vctmae.model import (
    CheckpointError,
    build_classifier,
    build_mae,
    load_mae_st,
    load_model,
    load_weights,
    save_model,
)


def _central(table, source_side=14, side=6):
    """The central side×side block of a (1, [T,] S, C) table, by explicit index lists."""
    keep = [
        r * source_side + c
        for r in range(4, 4 + side)
        for c in range(4, 4 + side)  # rows/cols 4..9 of 14
    ]
    return table[..., keep, :]


def _kinetics_pyslowfast(seed=0):
    """A 224² (14×14) PySlowFast-layout MAE checkpoint: decoder_pos_embed with a leading cls row."""
    state = mae_st_state(side=14, decoder_layout="full", decoder_cls=True, seed=seed)
    del state["decoder_cls_token"]  # only the positional row, as the released checkpoints
    return state, to_pyslowfast(state, decoder_depth=2)


def assert_computes_like_mae_st(model, state, *, batch: int, seed: int) -> None:
    """`model` (2 blocks of 4 heads, a decoder of 2 blocks of 2) gives mae_st's loss, predictions
    and mask with the weights `state`, on seeded random crops."""
    crops, frames = random_crops(batch, seed=seed), random_frames(batch, seed=seed)
    imgs = crop_clip(crops, frames).repeat(1, 3, 1, 1, 1)  # mae_st's RGB input
    noise = torch.rand(batch, 288)
    expected = reference_mae(state, imgs, noise, heads=4, decoder_heads=2, depth=2, decoder_depth=2)
    with torch.no_grad():
        got = model(crops, frames, noise=noise)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_pyslowfast_224_checkpoint_loads_with_central_crop(tmp_path):
    state, pyslowfast = _kinetics_pyslowfast(seed=1)
    assert "pred_head.transforms.0.2.weight" in pyslowfast  # the decoder norm
    path = tmp_path / "kinetics.pth"
    torch.save({"model_state": pyslowfast, "epoch": 1600}, path)
    model = build_mae("tiny", **SMALL).eval()
    report = load_mae_st(path, model, pos_init="crop")
    assert report.missing == [] and report.unexpected == []
    assert report.cropped == ["decoder_pos_embed", "pos_embed_spatial"]
    assert len(report.loaded) == len(model.state_dict())

    spatial = _central(state["pos_embed_spatial"])  # (1, 36, 32)
    torch.testing.assert_close(model.pos_embed_spatial.data, spatial, rtol=0, atol=0)
    decoder_grid = state["decoder_pos_embed"][:, 1:].reshape(1, 8, 196, 16)
    decoder = _central(decoder_grid).reshape(1, 288, 16)
    torch.testing.assert_close(model.decoder_pos_embed.data, decoder, rtol=0, atol=0)
    torch.testing.assert_close(model.decoder_norm.weight.data, state["decoder_norm.weight"])
    torch.testing.assert_close(model.decoder_pred.bias.data, state["decoder_pred.bias"])
    qkv = torch.cat([state[f"decoder_blocks.1.attn.{n}.weight"] for n in "qkv"])
    torch.testing.assert_close(model.decoder_blocks[1].attn.qkv.weight.data, qkv)

    # The loaded model computes what mae_st computes with the cropped tables at 96².
    cropped = dict(state, pos_embed_spatial=spatial, decoder_pos_embed=decoder)
    assert_computes_like_mae_st(model, cropped, batch=2, seed=11)


def test_mae_st_separable_224_checkpoint_into_a_decoder_cls_model(tmp_path):
    state = mae_st_state(side=14, decoder_layout="separable", decoder_cls=True, seed=2)
    path = tmp_path / "mae_st.pth"
    torch.save({"model": state}, path)
    model = build_mae("tiny", decoder_cls=True, **SMALL).eval()
    report = load_mae_st(path, model)
    assert report.missing == [] and report.unexpected == []
    spatial = _central(state["decoder_pos_embed_spatial"])  # (1, 36, 16)
    full = spatial.repeat(1, 8, 1) + state["decoder_pos_embed_temporal"].repeat_interleave(36, 1)
    expected_table = torch.cat([state["decoder_pos_embed_class"], full], dim=1)  # (1, 289, 16)
    torch.testing.assert_close(model.decoder_pos_embed.data, expected_table)

    cropped = dict(
        state,
        pos_embed_spatial=_central(state["pos_embed_spatial"]),
        decoder_pos_embed_spatial=spatial,
    )
    assert_computes_like_mae_st(model, cropped, batch=1, seed=12)


def test_pos_init_interpolate_and_random():
    state, pyslowfast = _kinetics_pyslowfast(seed=3)
    model = build_mae("tiny", **SMALL)
    report = load_mae_st(pyslowfast, model, pos_init="interpolate")
    grid = state["pos_embed_spatial"].reshape(1, 14, 14, 32).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    torch.testing.assert_close(
        model.pos_embed_spatial.data, resized.permute(0, 2, 3, 1).reshape(1, 36, 32)
    )
    assert report.cropped == ["decoder_pos_embed", "pos_embed_spatial"]

    model = build_mae("tiny", **SMALL)
    before = (model.pos_embed_spatial.clone(), model.decoder_pos_embed.clone())
    report = load_mae_st(pyslowfast, model, pos_init="random")
    assert sorted(report.reinitialized) == ["decoder_pos_embed", "pos_embed_spatial"]
    assert report.missing == [] and report.unexpected == []
    assert torch.equal(model.pos_embed_spatial, before[0])
    assert torch.equal(model.decoder_pos_embed, before[1])
    torch.testing.assert_close(model.pos_embed_temporal.data, state["pos_embed_temporal"])
    with pytest.raises(ValueError, match="pos_init"):
        load_mae_st(pyslowfast, model, pos_init="nearest")  # type: ignore[arg-type]


def test_mae_checkpoint_into_a_classifier_reports_the_missing_head():
    state, pyslowfast = _kinetics_pyslowfast(seed=4)
    classifier = build_classifier("tiny", num_classes=2, **SMALL)
    report = load_mae_st({"model_state": pyslowfast}, classifier)
    assert report.missing == ["head.weight", "head.bias"]
    assert {"mask_token", "decoder_pred.weight", "decoder_blocks.0.attn.qkv.weight"} <= set(
        report.unexpected
    )
    assert report.cropped == ["pos_embed_spatial"]
    torch.testing.assert_close(
        classifier.pos_embed_spatial.data, _central(state["pos_embed_spatial"])
    )
    torch.testing.assert_close(classifier.norm.bias.data, state["norm.bias"])


@pytest.mark.parametrize("kind", ["mae", "classifier"])
def test_full_vit_large_key_set_loads_without_missing_keys(kind):
    # Shapes only (meta tensors): the whole ViT-L/16 Kinetics key set, PySlowFast names.
    source = mae_st_state(
        dim=1024,
        depth=24,
        decoder_dim=512,
        decoder_depth=4,
        side=14,
        decoder_layout="full",
        decoder_cls=True,
        device="meta",
    )
    del source["decoder_cls_token"]
    source = to_pyslowfast(source, decoder_depth=4)
    assert "pred_head.transforms.0.4.bias" in source and "blocks.23.attn.q.weight" in source
    with torch.device("meta"):
        model = build_mae("large") if kind == "mae" else build_classifier("large")
    report = load_mae_st({"model_state": source}, model)
    if kind == "mae":
        assert report.missing == [] and report.unexpected == []
        assert len(report.loaded) == len(model.state_dict())
    else:
        assert report.missing == ["head.weight", "head.bias"]
        assert all(k.startswith(("decoder", "mask_token")) for k in report.unexpected)


def test_unadaptable_shapes_name_the_key_and_both_shapes():
    model = build_mae("tiny", **SMALL)
    state = mae_st_state(seed=5)
    state["patch_embed.proj.weight"] = torch.zeros(32, 3, 4, 16, 16)  # t_patch 4
    with pytest.raises(
        CheckpointError,
        match=r"patch_embed\.proj\.weight.*\(32, 3, 4, 16, 16\).*\(32, 3, 2, 16, 16\)",
    ):
        load_mae_st(state, model)

    state = mae_st_state(seed=5)
    state["pos_embed_temporal"] = torch.zeros(1, 4, 32)
    with pytest.raises(CheckpointError, match=r"pos_embed_temporal.*\(1, 4, 32\).*\(1, 8, 32\)"):
        load_mae_st(state, model)

    state = mae_st_state(seed=5)
    joint = torch.zeros(1, 1 + 8 * 196, 32)
    del state["pos_embed_spatial"], state["pos_embed_temporal"], state["pos_embed_class"]
    state["pos_embed"] = joint
    with pytest.raises(CheckpointError, match=r"pos_embed: source shape \(1, 1569, 32\)"):
        load_mae_st(state, model)

    state = mae_st_state(side=4, seed=5)  # a 4×4 grid cannot be cropped to 6×6
    with pytest.raises(CheckpointError, match="pos_embed_spatial.*interpolate"):
        load_mae_st(state, model)


class _Payload:
    """What a malicious checkpoint holds: unpickling it would run a shell command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _mae_st_args() -> argparse.Namespace:
    """An `args` like mae_st's main_pretrain.py saves (plain values of every kind it parses)."""
    return argparse.Namespace(
        model="mae_vit_large_patch16", batch_size=2, epochs=400, blr=1.6e-3, mask_ratio=0.9,
        norm_pix_loss=True, num_frames=16, t_patch_size=2, sep_pos_embed=True, fp32=True,
        output_dir="./output_dir", resume="", path_to_data_dir=None, repeat_aug=4,
        decoder_embed_dim=512, cls_embed=True, jitter_scales_relative=[0.08, 1.0],
    )  # fmt: skip


@pytest.mark.parametrize("layout", ["mae_st", "pyslowfast"])
def test_real_kinetics_file_layouts_load(tmp_path, layout):
    """Both layouts mae_st publishes: its own training files ({model, optimizer, epoch, scaler,
    args} with args an argparse.Namespace, util/misc.py save_model) and PySlowFast's .pyth
    ({epoch, model_state, optimizer_state, cfg} with cfg a YAML string)."""
    state, pyslowfast = _kinetics_pyslowfast(seed=11)
    weight = torch.randn(4, 4)
    if layout == "mae_st":
        content = {
            "model": pyslowfast,
            "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": weight}},
                          "param_groups": [{"lr": 1e-4, "params": [0]}]},
            "epoch": 399,
            "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 17},
            "args": _mae_st_args(),
        }  # fmt: skip
    else:
        content = {
            "epoch": 400,
            "model_state": pyslowfast,
            "optimizer_state": {"state": {}, "param_groups": [{"lr": 1e-4, "params": []}]},
            "cfg": "MAE:\n  ENABLE: true\n  MASK_RATIO: 0.9\nDATA:\n  NUM_FRAMES: 16\n",
        }
    path = tmp_path / ("k700.pth" if layout == "mae_st" else "k700_400ep_rep4_mr9_16x4.pyth")
    torch.save(content, path)
    model = build_mae("tiny", **SMALL).eval()
    report = load_mae_st(path, model, pos_init="crop")
    assert report.missing == [] and report.unexpected == []
    torch.testing.assert_close(
        model.pos_embed_spatial.detach(), _central(state["pos_embed_spatial"]), rtol=0, atol=0
    )


@pytest.mark.parametrize("where", ["top level", "inside the Namespace"])
def test_other_pickled_objects_are_refused_without_running(tmp_path, where):
    marker = tmp_path / "payload-ran"
    payload = _Payload(f"touch {marker}")
    args = _mae_st_args()
    if where == "inside the Namespace":
        args.hook = payload
        content = {"model": mae_st_state(seed=6), "args": args}
    else:
        content = {"model": mae_st_state(seed=6), "args": args, "scaler": payload}
    path = tmp_path / "evil.pth"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match="evil.pth.*refused"):
        load_mae_st(path, build_mae("tiny", **SMALL))
    assert not marker.exists()


class _CompiledLike(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self._orig_mod = model


def test_safetensors_round_trip(tmp_path):
    torch.manual_seed(7)
    mae = build_mae("tiny", **SMALL).eval()
    path = save_model(mae, tmp_path / "run" / "mae.safetensors")
    config = json.loads((tmp_path / "run" / "mae.json").read_text())
    assert config["kind"] == "mae" and config["config"]["embed_dim"] == 32
    loaded = load_model(path).eval()
    assert type(loaded) is type(mae) and loaded.config == mae.config
    for key, value in mae.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    crops, frames = random_crops(1, seed=13), random_frames(1, seed=13)
    noise = torch.rand(1, 288)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(crops, frames, noise=noise)[1],
            mae(crops, frames, noise=noise)[1],
            rtol=0,
            atol=0,
        )

    classifier = build_classifier("tiny", num_classes=3, **SMALL)
    report = load_weights(classifier, path)  # an MAE file into a classifier
    assert report.missing == ["head.weight", "head.bias"]
    assert "mask_token" in report.unexpected
    assert torch.equal(classifier.blocks[1].mlp.fc2.weight, mae.blocks[1].mlp.fc2.weight)

    # A torch.compile-style wrapper (`_orig_mod`) is looked through.
    saved = save_model(_CompiledLike(classifier), tmp_path / "classifier.safetensors")
    again = load_model(saved)
    assert again.config.num_classes == 3 and torch.equal(again.head.weight, classifier.head.weight)


def test_an_mae_state_loads_into_a_classifier_sharing_the_encoder():
    torch.manual_seed(8)
    mae = build_mae("tiny", **SMALL)
    classifier = build_classifier("tiny", num_classes=2, **SMALL)
    report = load_weights(classifier, mae.state_dict())
    assert report.missing == ["head.weight", "head.bias"]
    assert torch.equal(classifier.patch_embed.proj.weight, mae.patch_embed.proj.weight)
    assert torch.equal(classifier.blocks[0].attn.qkv.weight, mae.blocks[0].attn.qkv.weight)
    assert torch.equal(classifier.norm.weight, mae.norm.weight)


def test_load_model_refuses_weights_that_do_not_match_the_config(tmp_path):
    path = save_model(build_mae("tiny", **SMALL), tmp_path / "m.safetensors")
    description = json.loads((tmp_path / "m.json").read_text())
    description["config"]["depth"] = 3
    (tmp_path / "m.json").write_text(json.dumps(description))
    # The description no longer has the digest the weights were saved with.
    with pytest.raises(CheckpointError, match="does not describe the weights in m.safetensors"):
        load_model(path)
    # A description without a digest (format 1) is checked by the strict load, key by key.
    (tmp_path / "m.json").write_text(json.dumps({**description, "version": 1}))
    with pytest.raises(CheckpointError, match="blocks.2"):
        load_model(path)
    (tmp_path / "m.json").unlink()
    with pytest.raises(CheckpointError, match="m.json"):
        load_model(path)


def test_a_checkpoint_from_before_input_normalisation_loads_as_identity(tmp_path):
    """Configs written before `input_mean`/`input_std` existed describe models trained on raw [0, 1]
    frames; they must load as exactly that, whatever the preset's normalisation is now."""
    classifier = build_classifier("tiny", **{**SMALL, "input_mean": 0.5, "input_std": 0.1})
    path = save_model(classifier, tmp_path / "old.safetensors")
    description = json.loads((tmp_path / "old.json").read_text())
    for name in ("input_mean", "input_std"):
        del description["config"][name]
    # Such configs were format 1, whose weights hold no digest of the description.
    (tmp_path / "old.json").write_text(json.dumps({**description, "version": 1}))
    loaded = load_model(path)
    assert (loaded.config.input_mean, loaded.config.input_std) == (0.0, 1.0)
    assert loaded.config.embed_dim == classifier.config.embed_dim
