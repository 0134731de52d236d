"""Small plain-torch re-implementations of the source architectures, used only by the converter tests.

Written from the architecture descriptions (arXiv 2404.10947 release, facebookresearch/mae, SiT), with
the sources' parameter names so that ``state_dict()`` has the released key layout:

- :class:`ReleasedDecayMAE`: the decayed MAE (packed qkv, decay per sublayer on the encoder, no final
  encoder norm, decoder input ``decoder_embed([decoder_cls_token, positions])``, skips popped last-first).
- :class:`PlainMAE`: facebookresearch/mae's encoder (with its final norm) and decoder (optional); the encoder
  also takes per-sublayer coefficients and an optional final norm, for the retrofit checks.
- :class:`ReferenceSiT`: SiT with adaLN-Zero blocks, decay over all sublayers and U-ViT long skips.

Attention is computed explicitly (softmax of scaled dot products), never through a library kernel.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

LN_EPS = 1e-6


def linear_coefficients(num_sublayers: int, alpha_min: float) -> list[float]:
    """``num_sublayers`` coefficients falling in equal steps from 1 to ``alpha_min``."""
    if num_sublayers == 1:
        return [1.0]
    return [1.0 - (1.0 - alpha_min) * k / (num_sublayers - 1) for k in range(num_sublayers)]


def sincos_table(width: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positions of a ``grid x grid`` patch grid, shape ``(grid**2, width)``, float64.

    Token ``r * grid + c`` (row ``r``, column ``c``) gets ``[sin(c w), cos(c w), sin(r w), cos(r w)]`` with
    ``w_i = 10000 ** (-i / (width / 4))``, the column block first, as in MAE's and SiT's tables.
    """
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )
    col_angles = cols.reshape(-1, 1) * omega
    row_angles = rows.reshape(-1, 1) * omega
    return torch.cat([col_angles.sin(), col_angles.cos(), row_angles.sin(), row_angles.cos()], dim=1)


class PatchEmbed(nn.Module):
    """Non-overlapping patches through a strided convolution, tokens in row-major order."""

    def __init__(self, channels: int, width: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, width, kernel_size=patch, stride=patch)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with one packed ``[q; k; v]`` projection."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        head_dim = width // self.heads
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, width))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, approximate: str = "none"):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class Block(nn.Module):
    """Pre-LN ViT block ``x = a1 x + attn(LN x); x = a2 x + mlp(LN x)``."""

    def __init__(self, width: int, heads: int, hidden: int, alphas: tuple[float, float] = (1.0, 1.0)):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=LN_EPS)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=LN_EPS)
        self.mlp = Mlp(width, hidden)
        self.alphas = alphas

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.alphas[0] * x + self.attn(self.norm1(x))
        return self.alphas[1] * x + self.mlp(self.norm2(x))


def mask_tokens(tokens: torch.Tensor, noise: torch.Tensor, mask_ratio: float):
    """Keep the ``int(N * (1 - mask_ratio))`` patches of lowest noise; return them, mask, restore order."""
    batch, count, width = tokens.shape
    keep = int(count * (1 - mask_ratio))
    order = torch.argsort(noise, dim=1)
    restore = torch.argsort(order, dim=1)
    kept = torch.gather(tokens, 1, order[:, :keep, None].expand(-1, -1, width))
    mask = torch.ones(batch, count, dtype=tokens.dtype)
    mask[:, :keep] = 0
    return kept, torch.gather(mask, 1, restore), restore


def unshuffle(tokens: torch.Tensor, filler: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
    """``[CLS, kept...]`` back to ``[CLS, all patches in order]``, masked patches set to ``filler``."""
    batch, kept, width = tokens.shape
    count = restore.shape[1]
    patches = torch.cat([tokens[:, 1:], filler.expand(batch, count - (kept - 1), width)], dim=1)
    patches = torch.gather(patches, 1, restore[:, :, None].expand(-1, -1, width))
    return torch.cat([tokens[:, :1], patches], dim=1)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``(B, C, H, W)`` to ``(B, patches, patch * patch * C)``, channel fastest."""
    batch, channels, height, width = images.shape
    grid_h, grid_w = height // patch, width // patch
    x = images.reshape(batch, channels, grid_h, patch, grid_w, patch).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(batch, grid_h * grid_w, patch * patch * channels)


def masked_mse(images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch: int, norm_pix: bool):
    target = patchify(images, patch)
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(-1)
    return (per_patch * mask).sum() / mask.sum()


class _MAEEncoder(nn.Module):
    """Patch embedding, CLS token, position table and blocks, shared by both MAE layouts."""

    def __init__(self, channels, image, patch, width, depth, heads, hidden, alphas):
        super().__init__()
        self.patch = patch
        count = (image // patch) ** 2
        self.patch_embed = PatchEmbed(channels, width, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, count + 1, width))
        self.blocks = nn.ModuleList(
            Block(width, heads, hidden, (alphas[2 * i], alphas[2 * i + 1])) for i in range(depth)
        )

    def embed(self, images, noise, mask_ratio):
        tokens = self.patch_embed(images) + self.pos_embed[:, 1:]
        kept, mask, restore = mask_tokens(tokens, noise, mask_ratio)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(images.shape[0], -1, -1)
        return torch.cat([cls, kept], dim=1), mask, restore


class ReleasedDecayMAE(_MAEEncoder):
    """The decayed MAE of the authors' release, at any size."""

    def __init__(
        self,
        *,
        channels=3,
        image=12,
        patch=4,
        width=16,
        depth=4,
        heads=2,
        hidden=32,
        decoder_width=8,
        decoder_depth=3,
        decoder_heads=2,
        decoder_hidden=16,
        min_decay=0.7,
        norm_pix_loss=True,
    ):
        super().__init__(
            channels, image, patch, width, depth, heads, hidden, linear_coefficients(2 * depth, min_decay)
        )
        count = (image // patch) ** 2
        self.norm_pix_loss = norm_pix_loss
        self.skip = nn.ModuleList(_SkipLayer(width, decoder_width) for _ in range(depth // 2))
        self.decoder_cls_token = nn.Parameter(torch.zeros(1, 1, decoder_width))
        self.decoder_embed = nn.Linear(decoder_width, decoder_width)
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, count + 1, decoder_width))
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_width, decoder_heads, decoder_hidden) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_width, eps=LN_EPS)
        self.decoder_pred = nn.Linear(decoder_width, patch * patch * channels)

    def forward(self, images, noise, mask_ratio):
        """``(loss, pred, mask)`` for the masking that ``noise`` fixes."""
        x, mask, restore = self.embed(images, noise, mask_ratio)
        skips = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index % 2 == 1:
                skips.append(x)
        start = torch.cat([self.decoder_cls_token, self.decoder_pos_embed[:, 1:]], dim=1)
        y = self.decoder_embed(start).expand(images.shape[0], -1, -1)
        for index, block in enumerate(self.decoder_blocks):
            if skips:
                y = self.skip[index](y, skips.pop(), restore)
            y = block(y)
        pred = self.decoder_pred(self.decoder_norm(y))[:, 1:]
        return masked_mse(images, pred, mask, self.patch, self.norm_pix_loss), pred, mask


class _SkipLayer(nn.Module):
    def __init__(self, width: int, decoder_width: int):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(width + decoder_width, decoder_width),
            nn.SiLU(),
            nn.Linear(decoder_width, decoder_width),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))

    def forward(self, decoder_tokens, skip, restore):
        skip = unshuffle(skip, self.mask_token, restore)
        return decoder_tokens + self.fc(torch.cat([skip, decoder_tokens], dim=-1))


class PlainMAE(_MAEEncoder):
    """facebookresearch/mae; ``decoder=False`` is the encoder-only layout of ``mae_pretrain_vit_*``."""

    def __init__(
        self,
        *,
        channels=3,
        image=12,
        patch=4,
        width=16,
        depth=3,
        heads=2,
        hidden=32,
        decoder=True,
        decoder_width=8,
        decoder_depth=2,
        decoder_heads=2,
        decoder_hidden=16,
        norm_pix_loss=False,
    ):
        super().__init__(channels, image, patch, width, depth, heads, hidden, [1.0] * (2 * depth))
        count = (image // patch) ** 2
        self.norm_pix_loss = norm_pix_loss
        self.norm = nn.LayerNorm(width, eps=LN_EPS)
        if decoder:
            self.decoder_embed = nn.Linear(width, decoder_width)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_width))
            self.decoder_pos_embed = nn.Parameter(torch.zeros(1, count + 1, decoder_width))
            self.decoder_blocks = nn.ModuleList(
                Block(decoder_width, decoder_heads, decoder_hidden) for _ in range(decoder_depth)
            )
            self.decoder_norm = nn.LayerNorm(decoder_width, eps=LN_EPS)
            self.decoder_pred = nn.Linear(decoder_width, patch * patch * channels)

    def set_encoder_coefficients(self, alphas: list[float]) -> None:
        """Retrofit: the encoder's sublayer coefficients (attention, MLP, attention, ...)."""
        for index, block in enumerate(self.blocks):
            block.alphas = (alphas[2 * index], alphas[2 * index + 1])

    def forward_encoder(self, images, noise, mask_ratio, final_norm=True):
        x, mask, restore = self.embed(images, noise, mask_ratio)
        for block in self.blocks:
            x = block(x)
        return (self.norm(x) if final_norm else x), mask, restore

    def forward(self, images, noise, mask_ratio):
        """``(loss, pred, mask)`` for the masking that ``noise`` fixes."""
        latent, mask, restore = self.forward_encoder(images, noise, mask_ratio)
        y = unshuffle(self.decoder_embed(latent), self.mask_token, restore) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            y = block(y)
        pred = self.decoder_pred(self.decoder_norm(y))[:, 1:]
        return masked_mse(images, pred, mask, self.patch, self.norm_pix_loss), pred, mask


class _TimestepEmbedder(nn.Module):
    def __init__(self, width: int, channels: int = 256):
        super().__init__()
        self.channels = channels
        self.mlp = nn.Sequential(nn.Linear(channels, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.channels // 2
        frequencies = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        angles = t.float()[:, None] * frequencies[None]
        features = torch.cat([angles.cos(), angles.sin()], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class _LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, width: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, width)  # last row: the null class


class _SiTBlock(nn.Module):
    def __init__(self, width, heads, alphas, skip):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=LN_EPS)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=LN_EPS)
        self.mlp = Mlp(width, 4 * width, approximate="tanh")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        self.skip = nn.Linear(width, width) if skip else None
        self.alphas = alphas

    def forward(self, x, c, skip=None):
        if skip is not None:
            x = x + self.skip(skip)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)
        x = self.alphas[0] * x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1)
        return self.alphas[1] * x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class _FinalLayer(nn.Module):
    def __init__(self, width, patch, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=LN_EPS)
        self.linear = nn.Linear(width, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class ReferenceSiT(nn.Module):
    """SiT of the release: ``depth // 2`` encoder and decoder blocks, decay over all sublayers."""

    def __init__(
        self,
        *,
        in_channels=4,
        grid=4,
        patch=2,
        width=16,
        depth=4,
        heads=2,
        num_classes=10,
        min_sigma=0.8,
        learn_sigma=True,
    ):
        super().__init__()
        self.patch, self.in_channels = patch, in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        alphas = linear_coefficients(2 * depth, min_sigma)
        half = depth // 2
        self.x_embedder = PatchEmbed(in_channels, width, patch)
        self.pos_embed = nn.Parameter(sincos_table(width, grid).float()[None])
        self.t_embedder = _TimestepEmbedder(width)
        self.y_embedder = _LabelEmbedder(num_classes, width)
        self.enc_blocks = nn.ModuleList(
            _SiTBlock(width, heads, alphas[2 * i : 2 * i + 2], skip=False) for i in range(half)
        )
        self.dec_blocks = nn.ModuleList(
            _SiTBlock(width, heads, alphas[2 * (i + half) : 2 * (i + half) + 2], skip=True)
            for i in range(half)
        )
        self.final_layer = _FinalLayer(width, patch, self.out_channels)

    def forward(self, x, t, y, all_channels=False):
        """The release's output (the first ``in_channels``), or every channel with ``all_channels``."""
        batch, _, height, width = x.shape
        tokens = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder.embedding_table(y)
        outputs = []
        for block in self.enc_blocks:
            tokens = block(tokens, c)
            outputs.append(tokens)
        for block in self.dec_blocks:
            tokens = block(tokens, c, outputs.pop())
        tokens = self.final_layer(tokens, c)
        p, grid_h, grid_w = self.patch, height // self.patch, width // self.patch
        image = tokens.reshape(batch, grid_h, grid_w, p, p, self.out_channels).permute(0, 5, 1, 3, 2, 4)
        image = image.reshape(batch, self.out_channels, height, width)
        return image if all_channels else image[:, : self.in_channels]
