"""Architecture tests of vctmae.model: presets, masking, targets, loss, channels, crop path, attention.

The models take int16 crops and per-sample frame indices; where a test needs the clip those
select, it is gathered by the plain loop `crop_clip`, and the model's parts are run on it
(`_mae_on_clip`, `_classifier_on_clip`) for the other side of the comparison.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from reference_code import crop_clip, random_crops, random_frames

from vctmae.data.frames import offset_frames
from vctmae.errors import UsageError
from vctmae.infer.device import install_patch_embed, resolve_patch_embed
from vctmae.model import (
    ModelConfig,
    build_classifier,
    build_mae,
    encode_with_attention,
    patchify,
    preset_config,
    random_masking,
    target_frame_indices,
    unpatchify,
    visible_count,
)

TINY = dict(
    embed_dim=32, depth=2, num_heads=4, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2
)


CPU = torch.device("cpu")
# The frames the decoder predicts: mae_st's linspace(0, 15, 8).long().
PREDICTED = [0, 2, 4, 6, 8, 10, 12, 15]


def _frames(crops, offsets):
    """The paper's clip of each crop, frame k = slice o + 6k (B, 1, 16, 96, 96), gathered plainly."""
    slices = torch.tensor([[int(o) + 6 * k for k in range(16)] for o in offsets])
    return crop_clip(crops, slices)


def _clip_target(mae, clip):
    """The MAE's regression target for a float clip (B, C, 16, 96, 96): the predicted frames,
    normalised as the model's input, patchified (a grey clip repeated over RGB)."""
    return patchify(mae.normalize_input(clip[:, :, PREDICTED]), t_patch=1, patch=16, channels=3)


def _mae_on_clip(mae, clip, noise, mask_ratio=0.8):
    """(loss, pred, mask) of the MAE on a float clip instead of crops, from its parts: tokens by
    `PatchEmbed.embed_clip` + positions, the kept ones by a plain gather, encoder, decoder, loss."""
    masking = random_masking(noise, mask_ratio)
    tokens = mae.patch_embed.embed_clip(clip) + mae.patch_pos_embed()  # (B, L, D)
    index = masking.ids_keep[:, :, None].expand(-1, -1, tokens.shape[-1])  # (B, K, D)
    latent = mae.encode_visible(torch.gather(tokens, 1, index))  # (B, K, D)
    pred = mae.forward_decoder(latent, masking.ids_restore)  # (B, L, 768)
    return mae.forward_loss(_clip_target(mae, clip), pred, masking.mask), pred, masking.mask


def _classifier_on_clip(classifier, clip):
    """Logits of the classifier on a float clip instead of crops, from its parts."""
    tokens = classifier.patch_embed.embed_clip(clip) + classifier.patch_pos_embed()  # (B, L, D)
    return classifier.classify(classifier.run_blocks(classifier.with_cls(tokens)))


# ----------------------------------------------------------------------------------------------
# Presets and configuration


@pytest.mark.parametrize(
    ("preset", "low", "high"),
    [("large", 302e6, 306e6), ("base", 85e6, 88e6), ("small", 21e6, 23e6), ("tiny", 1e6, 4e6)],
)
def test_preset_encoder_sizes(preset, low, high):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        mae = build_mae(preset)
        classifier = build_classifier(preset)
    encoder = sum(
        p.numel()
        for name, p in mae.named_parameters()
        if not (name.startswith("decoder") or name == "mask_token")
    )
    assert low < encoder < high
    head = sum(p.numel() for name, p in classifier.named_parameters() if name.startswith("head"))
    assert sum(p.numel() for p in classifier.parameters()) == encoder + head
    assert mae.pos_embed_spatial.shape == (1, 36, mae.config.embed_dim)
    assert mae.pos_embed_temporal.shape == (1, 8, mae.config.embed_dim)
    assert mae.pos_embed_class.shape == (1, 1, mae.config.embed_dim)
    assert tuple(mae.patch_embed.proj.weight.shape) == (mae.config.embed_dim, 3, 2, 16, 16)


def test_large_preset_is_the_paper_model():
    config = preset_config("large")
    assert (config.embed_dim, config.depth, config.num_heads) == (1024, 24, 16)
    assert (config.decoder_embed_dim, config.decoder_depth, config.decoder_num_heads) == (
        512,
        4,
        16,
    )
    assert config.grid == (8, 6, 6) and config.num_tokens == 288
    assert config.t_pred_patch == 1 and config.pred_dim == 768


def test_config_is_frozen_and_validated():
    config = preset_config("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.depth = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="num_heads"):
        preset_config("tiny", num_heads=5)
    with pytest.raises(ValueError, match="preset"):
        preset_config("huge")
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="input_std"):
        preset_config("tiny", input_std=0.0)
    with pytest.raises(ValueError, match="input_mean"):
        preset_config("tiny", input_mean=float("nan"))


def test_every_count_and_size_of_a_config_must_be_positive():
    sizes = ["embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_num_heads"]
    sizes += ["frames", "t_patch", "patch", "img", "in_chans", "pred_t_dim", "num_classes"]
    for name in sizes:
        with pytest.raises(ValueError, match=f"{name} must be positive, got 0"):
            preset_config("tiny", **{name: 0})
    # A decoder may have no blocks.
    assert preset_config("tiny", decoder_depth=0).decoder_depth == 0
    with pytest.raises(ValueError, match="decoder_depth must be >= 0"):
        preset_config("tiny", decoder_depth=-1)


@pytest.mark.parametrize("preset", ["large", "base", "small", "tiny"])
def test_every_preset_trains_on_a_tiny_input(preset):
    # The real widths and heads of each preset, one block deep to keep CI fast (tiny in full).
    overrides = {} if preset == "tiny" else {"depth": 1, "decoder_depth": 1}
    torch.manual_seed(0)
    mae = build_mae(preset, **overrides)
    loss, pred, mask = mae(random_crops(1), random_frames(1), mask_ratio=0.8)
    loss.backward()
    assert torch.isfinite(loss) and pred.shape == (1, 288, 768) and mask.shape == (1, 288)
    grads = [p.grad for p in mae.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert mae.patch_embed.proj.weight.grad.abs().sum() > 0

    classifier = build_classifier(preset, num_classes=2, **overrides)
    logits = classifier(random_crops(1, seed=1), offset_frames(torch.tensor([2])))
    logits.sum().backward()
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()
    assert all(torch.isfinite(p.grad).all() for p in classifier.parameters())


# ----------------------------------------------------------------------------------------------
# Masking, target and loss


def test_masking_keeps_57_of_288_and_is_reproducible():
    assert visible_count(288, 0.8) == 57
    mae = build_mae("tiny", **TINY).eval()
    crops, frames = random_crops(2), random_frames(2)
    noise = torch.rand(2, 288)
    latent, mask, ids_restore = mae.forward_encoder(crops, frames, 0.8, noise=noise)
    assert latent.shape == (2, 57, 32)
    assert mask.sum(1).tolist() == [231.0, 231.0]
    # the visible tokens are exactly the 57 smallest noise values
    smallest = torch.argsort(noise, dim=1)[:, :57]
    for b in range(2):
        assert set(torch.nonzero(mask[b] == 0).flatten().tolist()) == set(smallest[b].tolist())
    assert sorted(ids_restore[0].tolist()) == list(range(288))
    with torch.no_grad():
        first = mae(crops, frames, noise=noise)
        again = mae(crops, frames, noise=noise.clone())
        other = mae(crops, frames, noise=torch.rand(2, 288))
    torch.testing.assert_close(first[1], again[1], rtol=0, atol=0)
    assert torch.equal(first[2], again[2])
    assert not torch.equal(first[2], other[2])


def test_random_masking_shapes():
    masking = random_masking(torch.rand(3, 10), 0.5)
    assert masking.ids_keep.shape == (3, 5) and masking.mask.shape == (3, 10)
    restored = torch.gather(
        torch.cat([masking.ids_keep, torch.zeros(3, 5, dtype=torch.long)], 1),
        1,
        masking.ids_restore,
    )
    visible = masking.mask == 0
    assert torch.equal(restored[visible], torch.nonzero(visible)[:, 1])


def test_target_frames_are_mae_st_linspace():
    assert target_frame_indices(16, 8).tolist() == [0, 2, 4, 6, 8, 10, 12, 15]


def test_target_layout_is_mae_st_patchify():
    """The model's target (grey frames of the crops, repeated over RGB) and the (u, p, q, c)
    layout with three distinct channels (patchify on an RGB clip)."""
    mae = build_mae("tiny", **TINY, input_mean=0.0, input_std=1.0)  # raw pixels as targets
    crops, frames = random_crops(2, seed=5), random_frames(2, seed=5)
    clip = crop_clip(crops, frames)  # (B, 1, 16, 96, 96)
    target = mae.target(crops, frames)  # (B, 288, 768)
    assert target.shape == (2, 288, 768)
    rgb = torch.rand(2, 3, 16, 96, 96)
    rgb_target = patchify(rgb[:, :, PREDICTED], t_patch=1, patch=16, channels=3)
    gen = torch.Generator().manual_seed(5)
    for _ in range(200):
        b, t, row, col = (int(torch.randint(n, (1,), generator=gen)) for n in (2, 8, 6, 6))
        p, q, c = (int(torch.randint(n, (1,), generator=gen)) for n in (16, 16, 3))
        token = t * 36 + row * 6 + col
        value_index = (p * 16 + q) * 3 + c  # (u, p, q, c) with u = 0
        frame, y, x = PREDICTED[t], row * 16 + p, col * 16 + q
        assert target[b, token, value_index] == clip[b, 0, frame, y, x]
        assert rgb_target[b, token, value_index] == rgb[b, c, frame, y, x]
    # unpatchify inverts it
    grey_rgb = clip[:, :, PREDICTED].expand(-1, 3, -1, -1, -1)
    torch.testing.assert_close(mae.unpatchify(target), grey_rgb, rtol=0, atol=0)
    torch.testing.assert_close(mae.unpatchify(rgb_target), rgb[:, :, PREDICTED], rtol=0, atol=0)


def test_patchify_with_two_frame_tubes_orders_time_first():
    clip = torch.arange(2 * 4 * 32 * 32, dtype=torch.float32).reshape(1, 2, 4, 32, 32)
    tokens = patchify(clip, t_patch=2, patch=16, channels=2)  # (1, 2*2*2, 2*16*16*2)
    u, p, q, c = 1, 3, 7, 1
    token = 1 * 4 + 0 * 2 + 1  # t=1, row=0, col=1
    expected = clip[0, c, 1 * 2 + u, 0 * 16 + p, 1 * 16 + q]
    assert tokens[0, token, ((u * 16 + p) * 16 + q) * 2 + c] == expected
    back = unpatchify(tokens, grid=(2, 2, 2), t_patch=2, patch=16)
    assert torch.equal(back, clip)


def test_loss_covers_masked_tokens_only():
    mae = build_mae("tiny", **TINY).eval()
    crops, frames = random_crops(2), offset_frames(torch.tensor([1, 4]))
    noise = torch.rand(2, 288)
    with torch.no_grad():
        loss, pred, mask = mae(crops, frames, noise=noise)
        target = mae.target(crops, frames)
        visible = (1 - mask).unsqueeze(-1)
        bumped = pred + 5.0 * torch.randn_like(pred) * visible  # change only visible tokens
        torch.testing.assert_close(mae.forward_loss(target, bumped, mask), loss)
        masked_bump = pred + 0.5 * mask.unsqueeze(-1)
        assert mae.forward_loss(target, masked_bump, mask) != loss
        per_token = ((pred - target) ** 2).mean(-1)
        torch.testing.assert_close(loss, per_token[mask.bool()].mean())


def test_norm_pix_loss_normalises_each_target_patch():
    mae = build_mae("tiny", norm_pix_loss=True, **TINY).eval()
    crops, frames = random_crops(1), random_frames(1)
    with torch.no_grad():
        loss, pred, mask = mae(crops, frames, noise=torch.rand(1, 288))
        target = mae.target(crops, frames)
        normed = (target - target.mean(-1, keepdim=True)) / (
            target.var(-1, keepdim=True) + 1e-6
        ) ** 0.5
        expected = (((pred - normed) ** 2).mean(-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, expected)


# ----------------------------------------------------------------------------------------------
# One channel == three replicated channels


def test_one_channel_equals_three_replicated_channels():
    """The folded one-channel patch embedding (what the model runs on crops) = the RGB Conv3d on
    the replicated clip; the target repeats the grey frames over RGB."""
    torch.manual_seed(1)
    mae = build_mae("tiny", **TINY).eval()
    classifier = build_classifier("tiny", **TINY).eval()
    crops, frames = random_crops(2, seed=3), random_frames(2, seed=3)
    grey = crop_clip(crops, frames)
    rgb = grey.expand(-1, 3, -1, -1, -1)
    noise = torch.rand(2, 288)
    with torch.no_grad():
        for model in (mae, classifier):
            # In float64, so that only the folding is compared, not fp32 sums of 512 vs 1536 terms.
            patch_embed = copy.deepcopy(model.patch_embed).double()
            torch.testing.assert_close(
                patch_embed.embed_clip(grey.double()),
                patch_embed.embed_clip(rgb.double()),
                rtol=1e-5,
                atol=1e-5,
            )
        loss1, pred1, mask1 = mae(crops, frames, noise=noise)
        loss3, pred3, mask3 = _mae_on_clip(mae, rgb, noise)
        torch.testing.assert_close(pred1, pred3, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss1, loss3, rtol=1e-5, atol=1e-6)
        grey_target = patchify(grey[:, :, PREDICTED], t_patch=1, patch=16, channels=3)
        rgb_target = patchify(rgb[:, :, PREDICTED], t_patch=1, patch=16, channels=3)
        torch.testing.assert_close(grey_target, rgb_target, rtol=0, atol=0)
        torch.testing.assert_close(
            mae.target(crops, frames), _clip_target(mae, rgb), rtol=0, atol=0
        )
        torch.testing.assert_close(
            classifier(crops, frames), _classifier_on_clip(classifier, rgb), rtol=1e-5, atol=1e-5
        )
    with pytest.raises(ValueError, match="channels"):
        mae.patch_embed.embed_clip(torch.rand(1, 2, 16, 96, 96))


def test_input_normalisation_equals_normalising_the_clip_by_hand():
    """A model with input_mean/std gives what the same weights give on (clip − mean) / std fed to
    an identity-normalised copy: patch tokens, MAE loss/target, classifier logits."""
    torch.manual_seed(4)
    mean, std = 0.3, 0.2
    normed = dict(TINY, input_mean=mean, input_std=std)
    plain = dict(TINY, input_mean=0.0, input_std=1.0)
    for build in (build_mae, build_classifier):
        model = build("tiny", **normed).eval()
        reference = build("tiny", **plain).eval()
        reference.load_state_dict(model.state_dict())
        # HU inside the window: clip values uniform in [0, 1], the magnitudes these fp32 bounds
        # were set for.
        crops = random_crops(2, seed=5, low=-1000, high=1001)
        frames = offset_frames(torch.tensor([0, 5]))
        grey = crop_clip(crops, frames)
        by_hand = (grey - mean) / std
        with torch.no_grad():
            expected = (
                torch.nn.functional.conv3d(
                    by_hand.expand(-1, 3, -1, -1, -1),
                    model.patch_embed.proj.weight,
                    model.patch_embed.proj.bias,
                    stride=(2, 16, 16),
                )
                .flatten(2)
                .transpose(1, 2)
            )
            no_positions = torch.zeros(1, 288, 32)
            torch.testing.assert_close(
                model.patch_embed(crops, frames, no_positions), expected, rtol=1e-5, atol=1e-5
            )
            if build is build_mae:
                noise = torch.rand(2, 288)
                got = model(crops, frames, noise=noise)
                want = _mae_on_clip(reference, by_hand, noise)
                for a, b in zip(got, want, strict=True):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
                target = model.target(crops, frames)
                torch.testing.assert_close(target, _clip_target(reference, by_hand))
                back = model.denormalize_input(model.unpatchify(target))
                predicted = target_frame_indices(16, 8)
                torch.testing.assert_close(back[:, :1], grey[:, :, predicted], rtol=1e-5, atol=1e-6)
            else:
                torch.testing.assert_close(
                    model(crops, frames),
                    _classifier_on_clip(reference, by_hand),
                    rtol=1e-5,
                    atol=1e-5,
                )


def test_kernel_arguments_fold_the_normalisation():
    """The Triton route's (weight, bias) on [0, 1] frames = the plain folded conv on normalised ones."""
    from vctmae.kernels import patch_embed_reference

    torch.manual_seed(5)
    model = build_mae("tiny", **dict(TINY, input_mean=0.4, input_std=0.25)).eval()
    crops, frames = random_crops(2, seed=8), random_frames(2, seed=8)
    weight, bias = model.patch_embed.kernel_weight_and_bias()
    with torch.no_grad():
        got = patch_embed_reference(crops, frames, weight, bias, keep=None, pos=None)
        want = model.patch_embed.embed_clip(crop_clip(crops, frames))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Crop path


def test_crop_path_equals_frames_path():
    """The models on crops + frame indices = their parts on the clip those indices select (gathered
    plainly): the paper's o + 6k through `offset_frames`, and arbitrary sorted slices."""
    torch.manual_seed(2)
    mae = build_mae("tiny", **TINY).eval()
    classifier = build_classifier("tiny", **TINY).eval()
    for model in (mae, classifier):
        assert install_patch_embed(model, "torch", CPU) == "torch"
    crops = random_crops(2, seed=4)
    offsets = torch.tensor([0, 5])
    arbitrary = random_frames(2, seed=4)
    cases = [
        (offset_frames(offsets), _frames(crops, offsets)),
        (arbitrary, crop_clip(crops, arbitrary)),
    ]
    for frames, clip in cases:
        noise = torch.rand(2, 288)
        with torch.no_grad():
            expected = _mae_on_clip(mae, clip, noise)
            got = mae(crops, frames, noise=noise)
            for a, b in zip(got, expected, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(
                classifier(crops, frames),
                _classifier_on_clip(classifier, clip),
                rtol=1e-5,
                atol=1e-6,
            )


def test_kernel_route_plumbing_equals_frames_path(monkeypatch):
    """The installed Triton route (keep ids, positional table, kernel arguments; target gathered
    from the crops) with the kernel's contract stood in by its torch reference, on CPU."""
    from vctmae.kernels import patch_embed_reference

    calls = []

    def kernel_stand_in(crops, frames, weight, bias, *, keep, pos):
        calls.append(None if keep is None else tuple(keep.shape))
        return patch_embed_reference(crops, frames, weight, bias, keep=keep, pos=pos)

    # The route imports its kernel from this module when it runs; no triton package is needed.
    stand_in = types.ModuleType("vctmae.kernels.triton_patch_embed")
    stand_in.patch_embed_triton = kernel_stand_in
    monkeypatch.setitem(sys.modules, "vctmae.kernels.triton_patch_embed", stand_in)
    monkeypatch.setattr("vctmae.kernels.triton_available", lambda: True)
    torch.manual_seed(3)
    mae = build_mae("tiny", **TINY).eval()
    classifier = build_classifier("tiny", **TINY).eval()
    for model in (mae, classifier):
        assert install_patch_embed(model, "triton", CPU) == "triton"
        assert model.patch_embed.backend == "triton"
    crops, frames = random_crops(3, seed=6), random_frames(3, seed=6)
    clip = crop_clip(crops, frames)
    noise = torch.rand(3, 288)
    loss, pred, mask = mae(crops, frames, noise=noise)
    loss.backward()
    grad_kernel = mae.patch_embed.proj.weight.grad.clone()
    mae.zero_grad()
    # embed_clip is the torch Conv3d, on the same (shared) parameters.
    ref_loss, ref_pred, ref_mask = _mae_on_clip(mae, clip, noise)
    ref_loss.backward()
    torch.testing.assert_close(pred, ref_pred, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(grad_kernel, mae.patch_embed.proj.weight.grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(
            classifier(crops, frames), _classifier_on_clip(classifier, clip), rtol=1e-4, atol=1e-5
        )
    assert calls == [(3, 57), None]


def test_installed_patch_embedding_shares_the_parameters(monkeypatch):
    """Swapping the route keeps the model's parameters (the same tensors) and state-dict keys, so
    optimizers and checkpoints are unaffected; swapping back gives the plain torch route."""
    monkeypatch.setattr("vctmae.kernels.triton_available", lambda: True)
    mae = build_mae("tiny", **TINY)
    keys, parameters = list(mae.state_dict()), list(mae.parameters())
    assert mae.patch_embed.backend == "torch"
    for choice, backend in (("triton", "triton"), ("torch", "torch"), ("auto", "torch")):
        install_patch_embed(mae, choice, CPU)
        assert mae.patch_embed.backend == backend
        assert list(mae.state_dict()) == keys
        assert all(a is b for a, b in zip(mae.parameters(), parameters, strict=True))


def test_real_triton_kernel_under_interpreter_matches_torch_route():
    """The installed Triton route with the real kernel, run by the Triton CPU interpreter."""
    pytest.importorskip("triton")
    script = textwrap.dedent(
        """
        import torch
        from vctmae.model import build_mae
        from vctmae.infer.device import install_patch_embed
        tiny = dict(embed_dim=32, depth=1, num_heads=4, decoder_embed_dim=16, decoder_depth=1,
                    decoder_num_heads=2)
        torch.manual_seed(0)
        mae = build_mae("tiny", **tiny).eval()
        crops = torch.randint(-1500, 2500, (1, 96, 96, 96), dtype=torch.int16)
        # Any 16 sorted slices, not only the paper's o + 6k.
        frames = torch.randperm(96)[:16].sort().values[None]
        noise = torch.rand(1, 288)
        cpu = torch.device("cpu")
        with torch.no_grad():
            assert install_patch_embed(mae, "triton", cpu) == "triton"
            kernel = mae(crops, frames, noise=noise)
            assert install_patch_embed(mae, "torch", cpu) == "torch"
            torch_route = mae(crops, frames, noise=noise)
        for a, b in zip(kernel, torch_route):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        print("ok")
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_patch_embed_choice_is_checked():
    with pytest.raises(UsageError, match="--patch-embed"):
        resolve_patch_embed("cuda", CPU)
    mae = build_mae("tiny", **TINY)
    before = mae.patch_embed
    with pytest.raises(UsageError, match="--patch-embed"):
        install_patch_embed(mae, "cuda", CPU)
    assert mae.patch_embed is before
    assert resolve_patch_embed("auto", CPU) == "torch"


# ----------------------------------------------------------------------------------------------
# Attention maps


def test_attention_maps_are_the_sdpa_attention():
    torch.manual_seed(4)
    classifier = build_classifier("tiny", **TINY).eval()
    crops, frames = random_crops(2, seed=7), random_frames(2, seed=7)
    with torch.no_grad():
        last, maps = encode_with_attention(classifier, crops, frames)
        torch.testing.assert_close(
            classifier.classify(last), classifier(crops, frames), rtol=1e-5, atol=1e-5
        )
        assert len(maps) == 2
        hidden = classifier.with_cls(classifier.embed(crops, frames))
        for block, probabilities in zip(classifier.blocks, maps, strict=True):
            assert probabilities.shape == (2, 4, 289, 289)
            torch.testing.assert_close(probabilities.sum(-1), torch.ones(2, 4, 289))
            # explicit softmax(q k^T / sqrt(d)) from the fused weights, written out here
            h = block.norm1(hidden)
            q, k, _ = block.attn.qkv(h).chunk(3, dim=-1)
            q = q.reshape(2, 289, 4, 8).transpose(1, 2)
            k = k.reshape(2, 289, 4, 8).transpose(1, 2)
            expected = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
            torch.testing.assert_close(probabilities, expected, rtol=1e-5, atol=1e-6)
            explicit, _ = block.forward_with_attention(hidden)
            hidden = block(hidden)  # SDPA path
            torch.testing.assert_close(explicit, hidden, rtol=1e-5, atol=1e-5)
    mae = build_mae("tiny", **TINY)
    assert len(encode_with_attention(mae, crops[:1], frames[:1])[1]) == 2


def test_bf16_autocast_forward_is_finite():
    mae = build_mae("tiny", **TINY)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, pred, _ = mae(random_crops(1), random_frames(1), noise=torch.rand(1, 288))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_drop_path_is_active_only_in_training():
    classifier = build_classifier("tiny", drop_path=0.5, head_dropout=0.0, **TINY)
    crops, frames = random_crops(2), offset_frames(torch.tensor([3, 3]))
    classifier.eval()
    with torch.no_grad():
        assert torch.equal(classifier(crops, frames), classifier(crops, frames))
        classifier.train()
        torch.manual_seed(0)
        a = classifier(crops, frames)
        torch.manual_seed(1)
        b = classifier(crops, frames)
    assert not torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# On a GPU (skipped cleanly without one)


@pytest.mark.cuda
def test_cuda_triton_route_matches_torch_route_in_bf16():
    pytest.importorskip("triton")
    device = torch.device("cuda")
    torch.manual_seed(0)
    mae = build_mae("tiny").to(device).eval()
    classifier = build_classifier("tiny").to(device).eval()
    crops = random_crops(4, seed=9).to(device)
    frames = offset_frames(torch.tensor([0, 1, 2, 5], device=device))
    noise = torch.rand(4, 288, device=device)
    assert resolve_patch_embed("auto", device) == "triton"
    results = {}
    for backend in ("triton", "torch"):
        for model in (mae, classifier):
            assert install_patch_embed(model, backend, device) == backend
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            loss, pred, mask = mae(crops, frames, noise=noise)
            logits = classifier(crops, frames)
        results[backend] = (loss.float(), pred.float(), mask, logits.float())
    kernel, reference = results["triton"], results["torch"]
    assert torch.equal(kernel[2], reference[2])
    # bf16 operands (8-bit mantissa) in both routes: relative differences of a few 1e-2.
    torch.testing.assert_close(kernel[1], reference[1], rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(kernel[0], reference[0], rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(kernel[3], reference[3], rtol=5e-2, atol=5e-2)


@pytest.mark.cuda
def test_cuda_training_step_through_the_kernel_has_finite_gradients():
    pytest.importorskip("triton")
    device = torch.device("cuda")
    mae = build_mae("tiny").to(device)
    assert install_patch_embed(mae, "triton", device) == "triton"
    crops = random_crops(2, seed=10).to(device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _, _ = mae(crops, offset_frames(torch.tensor([3, 4], device=device)))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in mae.parameters())
    assert mae.patch_embed.proj.weight.grad.abs().sum() > 0
