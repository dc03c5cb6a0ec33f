"""Plain, independent transcriptions of the reference code the tests compare with.

- mae_st's model: random mae_st-layout state dicts (`mae_st_state`, `to_pyslowfast` for
  PySlowFast's decoder names) and its forward written out plainly (separate q/k/v, explicit
  softmax, Conv3d: `reference_mae`, `reference_classifier`); the clips it takes are gathered
  from int16 crops by a plain loop (`crop_clip`).
- the paper's public code's clip rules (lbuess/Video-CT_MAE at d27e0b2), in numpy:
  `reference_frames`, `reference_shift_range` and the in-plane context cut
  (`reference_context_cut`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def random_crops(batch, seed=0, *, low=-1500, high=2500):
    """int16 HU crops (B, 96, 96, 96) uniform in [low, high): by default spanning beyond the clip
    window [-1000, 1000], so the clipping is exercised; low=-1000, high=1001 gives clips uniform in
    [0, 1] like `torch.rand`."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (batch, 96, 96, 96), generator=gen, dtype=torch.int16)


def random_frames(batch, seed=0):
    """Per-sample frame indices (B, 16): 16 sorted slices drawn from 96, not the paper's o + 6k."""
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(96, generator=gen)[:16].sort().values for _ in range(batch)])


def crop_clip(crops, frames):
    """Clip (B, 1, 16, 96, 96): frame k of sample b is slice crops[b, frames[b, k]], HU clipped
    to [-1000, 1000] and scaled to [0, 1], written out plainly."""
    out = torch.empty(crops.shape[0], 1, frames.shape[1], 96, 96)
    for b in range(crops.shape[0]):
        for k in range(frames.shape[1]):
            hu = crops[b, int(frames[b, k])].float()
            out[b, 0, k] = (hu.clamp(-1000, 1000) + 1000) / 2000
    return out


def _block_state(prefix, dim, hidden, rnd):
    state = {
        f"{prefix}norm1.weight": 1 + rnd(dim, scale=0.1),
        f"{prefix}norm1.bias": rnd(dim, scale=0.1),
        f"{prefix}norm2.weight": 1 + rnd(dim, scale=0.1),
        f"{prefix}norm2.bias": rnd(dim, scale=0.1),
        f"{prefix}attn.proj.weight": rnd(dim, dim, scale=dim**-0.5),
        f"{prefix}attn.proj.bias": rnd(dim, scale=0.05),
        f"{prefix}mlp.fc1.weight": rnd(hidden, dim, scale=dim**-0.5),
        f"{prefix}mlp.fc1.bias": rnd(hidden, scale=0.05),
        f"{prefix}mlp.fc2.weight": rnd(dim, hidden, scale=hidden**-0.5),
        f"{prefix}mlp.fc2.bias": rnd(dim, scale=0.05),
    }
    for name in ("q", "k", "v"):
        state[f"{prefix}attn.{name}.weight"] = rnd(dim, dim, scale=dim**-0.5)
        state[f"{prefix}attn.{name}.bias"] = rnd(dim, scale=0.05)
    return state


def mae_st_state(
    *,
    dim=32,
    depth=2,
    decoder_dim=16,
    decoder_depth=2,
    side=6,
    frames=8,
    decoder_layout="separable",
    decoder_cls=True,
    in_chans=3,
    t_patch=2,
    patch=16,
    pred_dim=768,
    seed=0,
    device="cpu",
):
    """A MaskedAutoencoderViT state dict as mae_st names it (sep_pos_embed, cls_embed).

    decoder_layout: "separable" (decoder_pos_embed_spatial/temporal[/class], mae_st) or
    "full" (one decoder_pos_embed, with a leading cls row when decoder_cls).
    """
    gen = None if device == "meta" else torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, scale=0.02):
        return torch.randn(*shape, generator=gen, device=device) * scale

    spatial = side * side
    state = {
        "patch_embed.proj.weight": rnd(dim, in_chans, t_patch, patch, patch, scale=0.05),
        "patch_embed.proj.bias": rnd(dim, scale=0.05),
        "cls_token": rnd(1, 1, dim, scale=0.5),
        "pos_embed_spatial": rnd(1, spatial, dim, scale=0.5),
        "pos_embed_temporal": rnd(1, frames, dim, scale=0.5),
        "pos_embed_class": rnd(1, 1, dim, scale=0.5),
        "norm.weight": 1 + rnd(dim, scale=0.1),
        "norm.bias": rnd(dim, scale=0.1),
        "decoder_embed.weight": rnd(decoder_dim, dim, scale=dim**-0.5),
        "decoder_embed.bias": rnd(decoder_dim, scale=0.05),
        "mask_token": rnd(1, 1, decoder_dim, scale=0.5),
        "decoder_norm.weight": 1 + rnd(decoder_dim, scale=0.1),
        "decoder_norm.bias": rnd(decoder_dim, scale=0.1),
        "decoder_pred.weight": rnd(pred_dim, decoder_dim, scale=decoder_dim**-0.5),
        "decoder_pred.bias": rnd(pred_dim, scale=0.05),
    }
    for i in range(depth):
        state.update(_block_state(f"blocks.{i}.", dim, 4 * dim, rnd))
    for i in range(decoder_depth):
        state.update(_block_state(f"decoder_blocks.{i}.", decoder_dim, 4 * decoder_dim, rnd))
    if decoder_cls:
        state["decoder_cls_token"] = rnd(1, 1, decoder_dim, scale=0.5)
    if decoder_layout == "separable":
        state["decoder_pos_embed_spatial"] = rnd(1, spatial, decoder_dim, scale=0.5)
        state["decoder_pos_embed_temporal"] = rnd(1, frames, decoder_dim, scale=0.5)
        if decoder_cls:
            state["decoder_pos_embed_class"] = rnd(1, 1, decoder_dim, scale=0.5)
    else:
        rows = frames * spatial + int(decoder_cls)
        state["decoder_pos_embed"] = rnd(1, rows, decoder_dim, scale=0.5)
    return state


def to_pyslowfast(state, decoder_depth):
    """Rename a mae_st state to PySlowFast's decoder names."""
    out = {}
    for key, value in state.items():
        if key.startswith("decoder_blocks."):
            key = "pred_head.transforms.0." + key[len("decoder_blocks.") :]
        elif key.startswith("decoder_norm."):
            key = f"pred_head.transforms.0.{decoder_depth}." + key[len("decoder_norm.") :]
        elif key.startswith("decoder_pred."):
            key = "pred_head.projections.0." + key[len("decoder_pred.") :]
        out[key] = value
    return out


def _ln(x, s, prefix):
    return F.layer_norm(x, (x.shape[-1],), s[prefix + "weight"], s[prefix + "bias"], EPS)


def _linear(x, s, prefix):
    return F.linear(x, s[prefix + "weight"], s[prefix + "bias"])


def _block(x, s, prefix, heads):
    h = _ln(x, s, prefix + "norm1.")
    B, N, C = h.shape
    q = _linear(h, s, prefix + "attn.q.").reshape(B, N, heads, C // heads).permute(0, 2, 1, 3)
    k = _linear(h, s, prefix + "attn.k.").reshape(B, N, heads, C // heads).permute(0, 2, 1, 3)
    v = _linear(h, s, prefix + "attn.v.").reshape(B, N, heads, C // heads).permute(0, 2, 1, 3)
    attn = (q @ k.transpose(-2, -1)) * (C // heads) ** -0.5
    attn = attn.softmax(dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(B, N, C)
    x = x + _linear(out, s, prefix + "attn.proj.")
    h = _ln(x, s, prefix + "norm2.")
    return x + _linear(F.gelu(_linear(h, s, prefix + "mlp.fc1.")), s, prefix + "mlp.fc2.")


def _patch_tokens(s, imgs, t_patch=2, patch=16):
    x = F.conv3d(
        imgs,
        s["patch_embed.proj.weight"],
        s["patch_embed.proj.bias"],
        stride=(t_patch, patch, patch),
    )
    x = x.flatten(3)  # N C T HW
    x = torch.einsum("ncts->ntsc", x)  # N T HW C
    N, T, L, C = x.shape
    return x.reshape(N, T * L, C), T, L


def _sep_pos(spatial, temporal, T, L):
    return spatial.repeat(1, T, 1) + torch.repeat_interleave(temporal, L, dim=1)


def reference_mae(
    s, imgs, noise, *, heads, decoder_heads, depth, decoder_depth, mask_ratio=0.8, pred_t_dim=8
):
    """mae_st MaskedAutoencoderViT.forward (sep_pos_embed, cls_embed) with a fixed noise."""
    x, T, L = _patch_tokens(s, imgs)
    N, _, C = x.shape
    # random_masking
    len_keep = int(T * L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, C))
    mask = torch.ones([N, T * L])
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    # encoder
    x = torch.cat((s["cls_token"].expand(N, -1, -1), x), dim=1)
    pos = _sep_pos(s["pos_embed_spatial"], s["pos_embed_temporal"], T, L).expand(N, -1, -1)
    pos = torch.gather(pos, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, C))
    pos = torch.cat([s["pos_embed_class"].expand(N, -1, -1), pos], 1)
    x = x + pos
    for i in range(depth):
        x = _block(x, s, f"blocks.{i}.", heads)
    x = _ln(x, s, "norm.")[:, 1:, :]
    # decoder
    x = _linear(x, s, "decoder_embed.")
    Cd = x.shape[-1]
    mask_tokens = s["mask_token"].repeat(N, T * L - x.shape[1], 1)
    x_ = torch.cat([x, mask_tokens], dim=1)
    x = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, Cd))
    decoder_cls = "decoder_cls_token" in s
    if decoder_cls:
        x = torch.cat((s["decoder_cls_token"].expand(N, -1, -1), x), dim=1)
    if "decoder_pos_embed_spatial" in s:
        dpos = _sep_pos(s["decoder_pos_embed_spatial"], s["decoder_pos_embed_temporal"], T, L)
        if decoder_cls:
            dpos = torch.cat([s["decoder_pos_embed_class"].expand(dpos.shape[0], -1, -1), dpos], 1)
    else:
        dpos = s["decoder_pos_embed"]
    x = x + dpos
    for i in range(decoder_depth):
        x = _block(x, s, f"decoder_blocks.{i}.", decoder_heads)
    x = _linear(_ln(x, s, "decoder_norm."), s, "decoder_pred.")
    pred = x[:, 1:, :] if decoder_cls else x
    # loss
    imgs3 = imgs if imgs.shape[1] == 3 else imgs.repeat(1, 3, 1, 1, 1)
    _imgs = torch.index_select(imgs3, 2, torch.linspace(0, imgs.shape[2] - 1, pred_t_dim).long())
    Nn, _, Tt, H, W = _imgs.shape
    p, u = 16, 1
    h = w = H // p
    t = Tt // u
    target = _imgs.reshape(Nn, 3, t, u, h, p, w, p)
    target = torch.einsum("nctuhpwq->nthwupqc", target).reshape(Nn, t * h * w, u * p * p * 3)
    loss = ((pred - target) ** 2).mean(dim=-1)
    loss = (loss * mask).sum() / mask.sum()
    return loss, pred, mask


def reference_classifier(s, imgs, *, heads, depth):
    """mae_st models_vit.VisionTransformer.forward (sep_pos_embed, cls_embed), eval mode."""
    x, T, L = _patch_tokens(s, imgs)
    N = x.shape[0]
    x = torch.cat((s["cls_token"].expand(N, -1, -1), x), dim=1)
    pos = _sep_pos(s["pos_embed_spatial"], s["pos_embed_temporal"], T, L)
    pos = torch.cat([s["pos_embed_class"].expand(pos.shape[0], -1, -1), pos], 1)
    x = x + pos
    for i in range(depth):
        x = _block(x, s, f"blocks.{i}.", heads)
    x = x[:, 1:, :].mean(dim=1)
    x = _ln(x, s, "norm.")
    return _linear(x, s, "head.")


# mae_st feeds its input straight to the patch embedding: identity input normalisation.
SMALL = dict(
    embed_dim=32,
    depth=2,
    num_heads=4,
    decoder_embed_dim=16,
    decoder_depth=2,
    decoder_num_heads=2,
    input_mean=0.0,
    input_std=1.0,
)


def reference_frames(width: int, shift: int) -> np.ndarray:
    """Frame indices inside the cut volume (may leave it: the reference does not check)."""
    points = np.round(np.linspace(0, width - 1, 16 + 2)).astype(int)
    return points[1:-1] + shift


def reference_shift_range(width: int) -> list[int]:
    inner = reference_frames(width, shift=0)
    spacing = int(inner[1] - inner[0])
    return list(range(-spacing // 2, spacing // 2))


def reference_context_cut(crop: np.ndarray, box: tuple, recentre: bool) -> np.ndarray:
    """numpy oracle: CropForegroundD(margin=(0, 16, 100), allow_smaller=True) on rows and
    columns, then ResizeWithPadOrCropD(spatial_size=(-1, 96, 96), mode="constant") — symmetric
    padding, (96 - s) // 2 before — with the pad value in HU (0 after scaling = -1000 HU)."""
    _, _, y0, y1, z0, z1 = box
    start, stop = max(y0 - 16, 0), min(y1 + 16, 96)
    kept = crop[:, start:stop, max(z0 - 100, 0) : min(z1 + 100, 96)]
    assert kept.shape[2] == 96  # margin 100: every column of a 96-wide crop
    out = np.full_like(crop, -1000)
    first = (96 - (stop - start)) // 2 if recentre else start
    out[:, first : first + (stop - start), :] = kept
    return out


EPS = 1e-6
