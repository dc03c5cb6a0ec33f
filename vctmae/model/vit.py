"""mae_st-compatible video ViT: blocks, the shared encoder, the MAE decoder and the classifier.

Read top to bottom: building blocks (stochastic depth, attention, MLP, transformer block, patch
embedding), then the encoder shared by both models (`VideoViT`), the masked autoencoder
(`MaskedAutoencoder`, Feichtenhofer et al. 2022) and the classifier (`VideoClassifier`, mae_st's
models_vit). Parameter names follow mae_st (`patch_embed.proj`, `pos_embed_spatial`, `blocks.{i}`,
`norm`, `decoder_*`, `head`) so checkpoints map one to one; the only internal difference is the
fused `attn.qkv` projection, which `vctmae.model.checkpoint` builds from mae_st's `attn.q/k/v`.

Both models take int16 crops (B, 96, 96, 96) and per-sample frame indices (B, 16) — which sagittal
slices form each sample's clip — and gather the clip themselves, so the model has one forward. The
patch embedding computes with plain torch unless `vctmae.infer.device` switches it to the fused
Triton kernel (same parameters, same tokens) — the choice of speed lives outside the model.

Shapes for the paper's geometry: clip (B, 1, 16, 96, 96) → 8×6×6 = L = 288 patch tokens of width
D; token index = t·36 + row·6 + col. With `img = 224` (Table 2 row 5, `--frame-size 224`) the
96² slices are padded centred to 224² frames (−1000 HU) and the grid is 8×14×14 = 1568 tokens,
the video weights' own positional table.

The 3-D MAE baseline (Table 3, `ModelConfig.input_kind = "volume"`, presets `mae3d-*`) is the
same encoder, decoder and head on another input step: its patch embedding (`VolumePatchEmbed`)
reads the whole crop (B, 1, 96, 96, 96) — the frame indices are accepted and not used — in 16³
cubes → 6×6×6 = 216 tokens (token index = s·36 + row·6 + col, s along the sagittal axis), and
its positions are one fixed 3-D sin-cos table (`sincos_positions`), as MAE's own fixed 2-D
sin-cos tables (He et al. 2022), which the paper kept (App. B.2.4).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from vctmae.clip import clip_frames, volume_voxels
from vctmae.model.config import ModelConfig, preset_config
from vctmae.model.masking import gather_tokens, random_masking

LAYER_NORM_EPS = 1e-6

# ----------------------------------------------------------------------------------------------
# Building blocks


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability `rate`."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)  # (B, 1, 1)
        return x * x.new_empty(shape).bernoulli_(keep) / keep


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection; SDPA does the attention."""

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)  # rows: [q; k; v], as mae_st's q, k, v
        self.proj = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, tokens, _ = x.shape
        # (B, N, 3, H, d)
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 × (B, H, N, d)
        return q, k, v

    def _merge(self, out: torch.Tensor) -> torch.Tensor:
        batch, _, tokens, _ = out.shape
        # (B, N, D)
        out = out.transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim)
        return self.proj(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(x)
        return self._merge(F.scaled_dot_product_attention(q, k, v))  # (B, N, D)

    def forward_with_probabilities(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same output through an explicit softmax, plus the probabilities (B, H, N, N).

        The one place attention is computed by hand: `encode_with_attention` needs the
        probabilities.
        """
        q, k, v = self._heads(x)
        scores = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5  # (B, H, N, N)
        probabilities = scores.float().softmax(dim=-1).to(q.dtype)
        return self._merge(probabilities @ v), probabilities


class Mlp(nn.Module):
    """Linear → GELU → Linear (timm/mae_st names fc1, fc2)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, *, qkv_bias: bool, drop_path: float
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attended, probabilities = self.attn.forward_with_probabilities(self.norm1(x))
        x = x + self.drop_path(attended)
        return x + self.drop_path(self.mlp(self.norm2(x))), probabilities


class PatchEmbed(nn.Module):
    """Crops + frame indices → patch tokens with positions, through mae_st's `Conv3d(3, D, (2, 16, 16))`.

    Non-overlapping tubes t_patch×patch×patch of the clip become tokens. A one-channel clip stands
    for its three replicated channels; rather than materialising RGB the
    kernel is folded (summed over input channels), which gives the same tokens. The input
    normalisation (x − mean) / std is folded in the same way: conv((x − m)/s) = conv(x; W/s) with
    bias b − (m/s)·ΣW, so clips stay in [0, 1] up to this layer.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        kernel = (config.t_patch, config.patch, config.patch)
        self.proj = nn.Conv3d(config.in_chans, config.embed_dim, kernel_size=kernel, stride=kernel)
        self.clip_shape = (config.frames, config.img, config.img)
        self.input_mean = config.input_mean
        self.input_std = config.input_std
        # "torch" (gather the clip, Conv3d) or "triton" (the fused kernel, on the same `proj`
        # parameters); chosen from outside the model by `vctmae.infer.device.install_patch_embed`.
        self.backend = "torch"

    def _normalised(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight / std, bias − mean/std · Σ over each output's full RGB kernel)."""
        mean, std = self.input_mean, self.input_std
        bias = self.proj.bias
        if mean == 0.0 and std == 1.0:
            return weight, bias
        total = self.proj.weight.sum(dim=(1, 2, 3, 4))  # (D,) all input channels, whole tube
        return weight / std, bias - (mean / std) * total

    def kernel_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight (D, t_patch·patch·patch), channel-summed, index (t, h, w) row-major (kernel
        layout), and bias (D,), both with the input normalisation folded in: the Triton kernel's
        arguments for one-channel [0, 1] frames."""
        return self._normalised(self.proj.weight.sum(1).flatten(1))

    def forward(
        self,
        crops: torch.Tensor,
        frames: torch.Tensor,
        pos: torch.Tensor,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """int16 crops (B, 96, 96, 96), frame indices (B, 16), positions (1, L, D) and optionally
        kept token ids (B, K) → tokens (B, L, D), or (B, K, D) with `keep`."""
        if self.backend == "triton":
            from vctmae.kernels.triton_patch_embed import patch_embed_triton

            weight, bias = self.kernel_weight_and_bias()
            return patch_embed_triton(crops, frames, weight, bias, keep=keep, pos=pos[0])
        tokens = self.embed_clip(self.read(crops, frames)) + pos  # (B, L, D)
        return tokens if keep is None else gather_tokens(tokens, keep)

    def read(self, crops: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """The model's input step: the clip (B, 1, 16, F, F) in [0, 1] the frame indices select."""
        return clip_frames(crops, frames, self.clip_shape[1])

    def embed_clip(self, x: torch.Tensor) -> torch.Tensor:
        """A clip (B, 1 or in_chans, 16, 96, 96) in [0, 1] → tokens without positions (B, L, D)."""
        if x.dim() != 5 or tuple(x.shape[2:]) != self.clip_shape:
            raise ValueError(
                f"expected a clip (B, C, {', '.join(map(str, self.clip_shape))}), got {tuple(x.shape)}"
            )
        weight = self.proj.weight  # (D, C, t_patch, patch, patch)
        if x.shape[1] == 1 and weight.shape[1] != 1:
            weight = weight.sum(1, keepdim=True)  # (D, 1, t_patch, patch, patch)
        elif x.shape[1] != weight.shape[1]:
            raise ValueError(
                f"clip has {x.shape[1]} channels; the model takes 1 or {weight.shape[1]}"
            )
        weight, bias = self._normalised(weight)
        x = F.conv3d(x, weight, bias, stride=self.proj.stride)  # (B, D, t, h, w)
        return x.flatten(2).transpose(1, 2)  # (B, t*h*w, D)


class VolumePatchEmbed(PatchEmbed):
    """The 3-D model's patch embedding: the whole crop through `Conv3d(1, D, 16³, stride 16³)`.

    Its input step reads the crop whole (`volume_voxels`, the frames' HU rule); the frame
    indices are accepted, so that every model is called `model(crops, frames)`, and not used.
    Everything else (normalisation folded into the kernel, `embed_clip`) is `PatchEmbed`'s.
    """

    def read(self, crops: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """int16 crops (B, 96, 96, 96) → the volume (B, 1, 96, 96, 96) in [0, 1]; `frames` unused."""
        return volume_voxels(crops)


def sincos_positions(grid: tuple[int, int, int], dim: int) -> torch.Tensor:
    """Fixed 3-D sin-cos positions (1, t·h·w, dim) of a token grid (t, h, w), in token order.

    The width is split into three even parts, one per axis (2·⌊dim/6⌋, 2·⌊dim/6⌋ and the rest:
    256 each for 768, 170/170/172 for 512); a part of width n encodes its axis index p as MAE's
    1-D table does: sin(p·ω_k) for k < n/2, then cos(p·ω_k), with ω_k = 10000^(−2k/n).
    """
    side = 2 * (dim // 6)
    widths = (side, side, dim - 2 * side)
    axes = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in grid), indexing="ij")
    parts = []
    for width, index in zip(widths, axes, strict=True):
        half = width // 2
        omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / half)  # (n/2,)
        angles = index.reshape(-1, 1) * omega  # (L, n/2)
        parts += [torch.sin(angles), torch.cos(angles)]
    return torch.cat(parts, dim=1).float()[None]  # (1, L, dim)


# ----------------------------------------------------------------------------------------------
# Encoder shared by the MAE and the classifier


class VideoViT(nn.Module):
    """Patch embedding, cls token, positional embeddings and the encoder blocks.

    Positions: a video model has mae_st's learned separable tables (`pos_embed_spatial`,
    `pos_embed_temporal`, `pos_embed_class`); a volume model one fixed 3-D sin-cos table
    `pos_embed` (a buffer computed from the grid: nothing to learn, save or load) and a cls
    token without a position (MAE's zero row). `norm` is the encoder's last LayerNorm; the MAE
    applies it to every token, the classifier (as mae_st's models_vit) to the pooled feature.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        t, h, w = config.grid
        dim = config.embed_dim
        self.patch_embed = VolumePatchEmbed(config) if config.volume else PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        if config.volume:
            positions = sincos_positions(config.grid, dim)  # (1, L, D)
            self.register_buffer("pos_embed", positions, persistent=False)
        else:
            self.pos_embed_spatial = nn.Parameter(torch.zeros(1, h * w, dim))
            self.pos_embed_temporal = nn.Parameter(torch.zeros(1, t, dim))
            self.pos_embed_class = nn.Parameter(torch.zeros(1, 1, dim))
        last = max(config.depth - 1, 1)
        rates = [config.drop_path * i / last for i in range(config.depth)]  # 0 … drop_path
        self.blocks = nn.ModuleList(
            Block(dim, config.num_heads, config.mlp_ratio, qkv_bias=config.qkv_bias, drop_path=rate)
            for rate in rates
        )
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

    def patch_pos_embed(self) -> torch.Tensor:
        """Positional embedding of every patch token (1, L, D): spatial[s] + temporal[t] at t·h·w + s
        (a volume model: its fixed table)."""
        if self.config.volume:
            return self.pos_embed
        t = self.config.grid[0]
        spatial = self.pos_embed_spatial.repeat(1, t, 1)  # (1, t*h*w, D)
        temporal = self.pos_embed_temporal.repeat_interleave(self.pos_embed_spatial.shape[1], dim=1)
        return spatial + temporal  # (1, t*h*w, D)

    def embed(
        self, crops: torch.Tensor, frames: torch.Tensor, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """int16 crops (B, 96, 96, 96) + frame indices (B, 16) → tokens with positions (B, L, D),
        or (B, K, D) for the kept token ids `keep` (B, K)."""
        return self.patch_embed(crops, frames, self.patch_pos_embed(), keep)

    def normalize_input(self, frames: torch.Tensor) -> torch.Tensor:
        """[0, 1] frames → what the model sees, (frames − input_mean) / input_std."""
        return (frames - self.config.input_mean) / self.config.input_std

    def denormalize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of `normalize_input` (for showing targets and reconstructions as [0, 1] frames)."""
        return x * self.config.input_std + self.config.input_mean

    def with_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        """Prepend the cls token (with its positional embedding): (B, N, D) → (B, 1+N, D)."""
        cls = self.cls_token if self.config.volume else self.cls_token + self.pos_embed_class
        cls = cls.expand(tokens.shape[0], -1, -1)  # (B, 1, D)
        return torch.cat([cls, tokens], dim=1)

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def init_weights(self) -> None:
        """mae_st's initialisation: xavier-uniform linears (q, k, v each), truncated-normal
        positions (a volume model's are fixed) and cls token."""
        learned = (
            ()
            if self.config.volume
            else (self.pos_embed_spatial, self.pos_embed_temporal, self.pos_embed_class)
        )
        for parameter in (self.cls_token, *learned):
            nn.init.trunc_normal_(parameter, std=0.02)
        self.apply(_init_linear_and_norm)
        conv = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(conv.view(conv.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)


def _init_linear_and_norm(module: nn.Module) -> None:
    # `Module.apply` visits children first, so an Attention's slices overwrite its qkv's plain init.
    if isinstance(module, Attention):
        # Xavier per q, k, v slice, as if they were mae_st's three separate (D, D) layers.
        for weight in module.qkv.weight.data.chunk(3, dim=0):
            nn.init.xavier_uniform_(weight)
        if module.qkv.bias is not None:
            nn.init.zeros_(module.qkv.bias)
        nn.init.xavier_uniform_(module.proj.weight)
        nn.init.zeros_(module.proj.bias)
    elif isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def encode_with_attention(
    model: VideoViT, crops: torch.Tensor, frames: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The encoder on crops (B, 96, 96, 96) at frame indices (B, 16), no masking: its output
    (B, 1+L, D) and each block's attention probabilities, for the attention pictures.

    The maps are one (B, heads, 1+L, 1+L) tensor per block (index 0 is the cls token, then
    tokens t·36 + row·6 + col). Works for the MAE and the classifier alike (a classifier's
    logits are `model.classify(output)`); the blocks' outputs are the same as the SDPA path's.
    Gradients flow unless the caller uses `torch.no_grad()`.
    """
    hidden = model.with_cls(model.embed(crops, frames))  # (B, 1+L, D)
    maps: list[torch.Tensor] = []
    for block in model.blocks:
        hidden, probabilities = block.forward_with_attention(hidden)  # (B, H, 1+L, 1+L)
        maps.append(probabilities)
    return hidden, maps


# ----------------------------------------------------------------------------------------------
# Masked autoencoder


def target_frame_indices(
    frames: int, pred_t_dim: int, device: torch.device | None = None
) -> torch.Tensor:
    """Frames the decoder predicts, exactly mae_st's: linspace(0, T−1, pred_t_dim).long() → 0,2,…,12,15."""
    return torch.linspace(0, frames - 1, pred_t_dim, device=device).long()


def patchify(clip: torch.Tensor, *, t_patch: int, patch: int, channels: int) -> torch.Tensor:
    """Clip (B, C, T, H, W) → per-token targets (B, L, u·p·p·channels) laid out (u, p, q, c) as mae_st.

    A one-channel clip is repeated over `channels` (the replicated-grey convention).
    """
    batch, clip_channels, frames, height, width = clip.shape
    t, h, w = frames // t_patch, height // patch, width // patch
    x = clip.reshape(batch, clip_channels, t, t_patch, h, patch, w, patch)  # n c t u h p w q
    x = torch.einsum("nctuhpwq->nthwupqc", x)  # (B, t, h, w, u, p, p, C)
    if clip_channels == 1 and channels != 1:
        x = x.expand(*x.shape[:-1], channels)  # (B, t, h, w, u, p, p, channels)
    return x.reshape(batch, t * h * w, t_patch * patch * patch * channels)  # (B, L, u*p*p*c)


def unpatchify(
    tokens: torch.Tensor, *, grid: tuple[int, int, int], t_patch: int, patch: int
) -> torch.Tensor:
    """Inverse of `patchify`: (B, L, u·p·p·c) → clip (B, c, t·u, h·p, w·p)."""
    t, h, w = grid
    batch = tokens.shape[0]
    x = tokens.reshape(batch, t, h, w, t_patch, patch, patch, -1)  # n t h w u p q c
    x = torch.einsum("nthwupqc->nctuhpwq", x)  # (B, c, t, u, h, p, w, q)
    return x.reshape(batch, x.shape[1], t * t_patch, h * patch, w * patch)


class MaskedAutoencoder(VideoViT):
    """Spatiotemporal MAE: encode the visible tubes, decode all, regress the masked target pixels."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        dim, decoder_dim = config.embed_dim, config.decoder_embed_dim
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        if config.decoder_cls:
            self.decoder_cls_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        # One full table (the Video-CT paper code's layout; mae_st's separable decoder tables and
        # PySlowFast's table with a cls row are converted into it on import). A volume model's is
        # fixed 3-D sin-cos, as its encoder's (and MAE's decoder table).
        if config.volume:
            positions = sincos_positions(config.grid, decoder_dim)  # (1, L, Dd)
            self.register_buffer("decoder_pos_embed", positions, persistent=False)
        else:
            self.decoder_pos_embed = nn.Parameter(
                torch.zeros(1, config.num_tokens + int(config.decoder_cls), decoder_dim)
            )
        self.decoder_blocks = nn.ModuleList(
            Block(
                decoder_dim,
                config.decoder_num_heads,
                config.mlp_ratio,
                qkv_bias=config.qkv_bias,
                drop_path=0.0,
            )
            for _ in range(config.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=LAYER_NORM_EPS)
        self.decoder_pred = nn.Linear(decoder_dim, config.pred_dim)
        self.init_weights()
        if not config.volume:
            nn.init.trunc_normal_(self.decoder_pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    # -- encoder ---------------------------------------------------------------------------------

    def encode_visible(self, visible: torch.Tensor) -> torch.Tensor:
        """Visible tokens with positions (B, K, D) → latent (B, K, D), cls dropped (as mae_st returns)."""
        x = self.with_cls(visible)  # (B, 1+K, D)
        x = self.norm(self.run_blocks(x))  # (B, 1+K, D)
        return x[:, 1:]  # (B, K, D)

    def forward_encoder(
        self,
        crops: torch.Tensor,
        frames: torch.Tensor,
        mask_ratio: float,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Crops + frame indices → (latent (B, K, D), mask (B, L), ids_restore (B, L)).

        Only the visible tokens are embedded (the Triton patch embedding computes no others).
        """
        masking = random_masking(self._noise(noise, crops.shape[0], crops.device), mask_ratio)
        visible = self.embed(crops, frames, keep=masking.ids_keep)  # (B, K, D)
        return self.encode_visible(visible), masking.mask, masking.ids_restore

    def _noise(self, noise: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        expected = (batch, self.config.num_tokens)
        if noise is None:
            return torch.rand(*expected, device=device)
        if tuple(noise.shape) != expected:
            raise ValueError(f"noise must be (B, L) = {expected}, got {tuple(noise.shape)}")
        return noise.to(device)

    # -- decoder ---------------------------------------------------------------------------------

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Latent (B, K, D) + ids_restore (B, L) → predictions (B, L, pred_dim) in token order."""
        x = self.decoder_embed(latent)  # (B, K, Dd)
        batch, visible, _ = x.shape
        masked = self.mask_token.expand(batch, self.config.num_tokens - visible, -1)  # (B, L-K, Dd)
        x = torch.cat([x, masked], dim=1)  # (B, L, Dd) in shuffled order
        x = gather_tokens(x, ids_restore)  # (B, L, Dd) in token order
        if self.config.decoder_cls:
            x = torch.cat([self.decoder_cls_token.expand(batch, -1, -1), x], dim=1)  # (B, 1+L, Dd)
        x = x + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_pred(self.decoder_norm(x))  # (B, [1+]L, pred_dim)
        return x[:, 1:] if self.config.decoder_cls else x  # (B, L, pred_dim)

    # -- loss ------------------------------------------------------------------------------------

    def target(self, crops: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """Regression target (B, L, pred_dim): the clip's frames linspace(0, T−1, pred_t_dim),
        normalised as the encoder's input (mae_st regresses the normalised pixels); a volume
        model's: every voxel of each cube (B, 216, 4096)."""
        cfg = self.config
        if cfg.volume:
            voxels = volume_voxels(crops)  # (B, 1, 96, 96, 96)
        else:
            indices = target_frame_indices(cfg.frames, cfg.pred_t_dim, frames.device)
            voxels = clip_frames(crops, frames[:, indices], cfg.img)  # (B, 1, pred_t_dim, H, W)
        target_frames = self.normalize_input(voxels)
        return patchify(
            target_frames, t_patch=cfg.t_pred_patch, patch=cfg.patch, channels=cfg.in_chans
        )

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """Predictions or targets (B, L, pred_dim) → clip (B, in_chans, pred_t_dim, H, W)."""
        cfg = self.config
        return unpatchify(tokens, grid=cfg.grid, t_patch=cfg.t_pred_patch, patch=cfg.patch)

    def forward_loss(
        self, target: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Mean squared error over the masked tokens only (mask (B, L), 1 = masked)."""
        target = target.float()
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as mae_st
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        per_token = (pred.float() - target).pow(2).mean(dim=-1)  # (B, L)
        return (per_token * mask).sum() / mask.sum()

    def forward(
        self,
        crops: torch.Tensor,
        frames: torch.Tensor,
        mask_ratio: float = 0.8,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """int16 crops (B, 96, 96, 96) + frame indices (B, 16) → (loss, pred (B, L, pred_dim),
        mask (B, L)); `noise` (B, L) decides the masking (drawn here when None)."""
        latent, mask, ids_restore = self.forward_encoder(crops, frames, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(self.target(crops, frames), pred, mask), pred, mask


# ----------------------------------------------------------------------------------------------
# Classifier


class VideoClassifier(VideoViT):
    """Encoder over all tokens → mean of the patch tokens (not cls) → LayerNorm → dropout → linear."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.dropout = nn.Dropout(config.head_dropout)
        self.head = nn.Linear(config.embed_dim, config.num_classes)
        self.init_weights()
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def classify(self, hidden: torch.Tensor) -> torch.Tensor:
        """Encoder output (B, 1+L, D) → logits (B, num_classes)."""
        pooled = self.norm(hidden[:, 1:].mean(dim=1))  # (B, D)
        return self.head(self.dropout(pooled))

    def forward(self, crops: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """int16 crops (B, 96, 96, 96) + frame indices (B, 16) → logits (B, num_classes)."""
        hidden = self.run_blocks(self.with_cls(self.embed(crops, frames)))  # (B, 1+L, D)
        return self.classify(hidden)


# ----------------------------------------------------------------------------------------------
# Builders


def build_mae(preset: str | ModelConfig = "large", **overrides) -> MaskedAutoencoder:
    """MAE from a preset name (`config.PRESETS`) with field overrides, or from a config."""
    config = preset if isinstance(preset, ModelConfig) else preset_config(preset, **overrides)
    return MaskedAutoencoder(config)


def build_classifier(
    preset: str | ModelConfig = "large", num_classes: int = 2, **overrides
) -> VideoClassifier:
    """Classifier from a preset name with field overrides, or from a config (num_classes replaced)."""
    if isinstance(preset, ModelConfig):
        return VideoClassifier(dataclasses.replace(preset, num_classes=num_classes, **overrides))
    return VideoClassifier(preset_config(preset, num_classes=num_classes, **overrides))
