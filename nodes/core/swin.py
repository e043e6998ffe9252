"""The Swin Transformer (Liu et al. 2021) that RAM uses as its image encoder: attention inside square windows with a
learned relative position bias, windows shifted by half on every second block, patch merging between stages.

Module and parameter names are those of the original implementation, so RAM's `visual_encoder.*` weights load
strict. The geometry is read from the weights (`swin_geometry`), never assumed. The two index/mask tables the
original keeps as buffers are rebuilt here and not stored (non-persistent), as they are fixed by the geometry.
"""
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

SHIFT_MASK = -100.0  # what the original adds to logits across shifted-window regions (not -inf)


@dataclass(frozen=True)
class SwinGeometry:
    in_channels: int
    patch: int
    embed_dim: int
    depths: tuple
    heads: tuple
    windows: tuple  # per stage; a stage one window wide has a smaller one than the rest
    mlp_ratio: int
    image_size: int

    def resolution(self, stage):
        return self.image_size // self.patch >> stage

    def dim(self, stage):
        return self.embed_dim << stage

    @property
    def features(self):
        return self.dim(len(self.depths) - 1)

    @property
    def tokens(self):
        """Tokens the encoder returns: the final stage's map plus the pooled token in front."""
        return self.resolution(len(self.depths) - 1) ** 2 + 1


def swin_geometry(weights, prefix=""):
    """The geometry of the Swin whose parameters `weights` holds (names after `prefix`). Embed width and patch come
    from the patch embedding, depths from the block count, heads and window of each stage from its relative
    position bias table [(2w - 1)^2, heads]. The input size is not stored anywhere: RAM's last stage is exactly
    one window, so it is that window times the patch times the stages' halvings. Raises KeyError naming a
    missing parameter."""
    def shape(name):
        if prefix + name not in weights:
            raise KeyError(prefix + name)
        return tuple(weights[prefix + name].shape)

    embed_dim, in_channels, patch, _ = shape("patch_embed.proj.weight")
    block = re.compile(re.escape(prefix) + r"layers\.(\d+)\.blocks\.(\d+)\.norm1\.weight")
    blocks = {}
    for match in filter(None, map(block.fullmatch, weights)):
        blocks.setdefault(int(match[1]), set()).add(int(match[2]))
    if not blocks:
        raise KeyError(prefix + "layers.0.blocks.0.norm1.weight")
    depths = tuple(len(blocks.get(stage, ())) for stage in range(max(blocks) + 1))
    tables = [shape(f"layers.{stage}.blocks.0.attn.relative_position_bias_table") for stage in range(len(depths))]
    windows = tuple((round(rows ** 0.5) + 1) // 2 for rows, _ in tables)
    mlp_ratio = shape("layers.0.blocks.0.mlp.fc1.weight")[0] // embed_dim
    image_size = windows[-1] * patch << (len(depths) - 1)
    return SwinGeometry(in_channels, patch, embed_dim, depths, tuple(heads for _, heads in tables), windows,
                        mlp_ratio, image_size)


def relative_position_index(window):
    """[w*w, w*w]: the bias table row for each (query, key) pair of a window, from their offset (dy, dx)."""
    y, x = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    dy = y.flatten()[:, None] - y.flatten()[None, :]
    dx = x.flatten()[:, None] - x.flatten()[None, :]
    return (dy + window - 1) * (2 * window - 1) + dx + window - 1


def shifted_window_mask(resolution, window, shift):
    """[windows, w*w, w*w]: SHIFT_MASK between tokens that share a window of the rolled map but come from
    different regions of the unrolled one (the roll wraps the far edge around), 0 elsewhere."""
    position = torch.arange(resolution)
    band = (position >= resolution - window).long() + (position >= resolution - shift).long()
    region = band[:, None] * 3 + band[None, :]
    labels = rearrange(region, "(y wy) (x wx) -> (y x) (wy wx)", wy=window, wx=window)
    differs = labels[:, :, None] != labels[:, None, :]
    return torch.zeros(differs.shape).masked_fill(differs, SHIFT_MASK)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class WindowAttention(nn.Module):
    def __init__(self, dim, heads, window):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)

    def position_bias(self):
        """[heads, w*w, w*w]"""
        return self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)

    def forward(self, windows, mask=None):
        """windows [image*window, w*w, C] (image-major); mask [windows, w*w, w*w] or None."""
        q, k, v = rearrange(self.qkv(windows), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        bias = self.position_bias().to(windows.dtype)
        if mask is not None:
            bias = (bias + mask[:, None].to(windows.dtype)).repeat(windows.shape[0] // mask.shape[0], 1, 1, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # scale head_dim^-0.5, as the original
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class SwinTransformerBlock(nn.Module):
    def __init__(self, dim, heads, window, resolution, shift, mlp_ratio):
        super().__init__()
        self.window, self.shift, self.resolution = window, shift, resolution
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * mlp_ratio)
        mask = shifted_window_mask(resolution, window, shift) if shift else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x):
        """x [B, r*r, C]"""
        w, s = self.window, self.shift
        h = self.norm1(x).unflatten(1, (self.resolution, self.resolution))
        if s:
            h = torch.roll(h, (-s, -s), dims=(1, 2))
        windows = rearrange(h, "b (y wy) (x wx) c -> (b y x) (wy wx) c", wy=w, wx=w)
        h = rearrange(self.attn(windows, self.attn_mask), "(b y x) (wy wx) c -> b (y wy) (x wx) c",
                      y=self.resolution // w, x=self.resolution // w, wy=w)
        if s:
            h = torch.roll(h, (s, s), dims=(1, 2))
        x = x + h.flatten(1, 2)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """Each 2x2 group of tokens concatenated (the original's order: top-left, bottom-left, top-right,
    bottom-right) and projected to twice the width."""

    def __init__(self, dim, resolution):
        super().__init__()
        self.resolution = resolution
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        groups = rearrange(x.unflatten(1, (self.resolution, self.resolution)),
                           "b (y dy) (x dx) c -> b (y x) (dx dy c)", dy=2, dx=2)
        return self.reduction(self.norm(groups))


class BasicLayer(nn.Module):
    """One stage: its blocks (every second one shifted, unless the map is a single window), then the merge."""

    def __init__(self, geometry, stage):
        super().__init__()
        dim, resolution, window = geometry.dim(stage), geometry.resolution(stage), geometry.windows[stage]
        if resolution % window:
            raise ValueError(f"stage {stage}: a {resolution}x{resolution} map does not tile into {window}-windows")
        shift = window // 2 if resolution > window else 0
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(dim, geometry.heads[stage], window, resolution, shift * (i % 2), geometry.mlp_ratio)
            for i in range(geometry.depths[stage]))
        last = stage == len(geometry.depths) - 1
        self.downsample = None if last else PatchMerging(dim, resolution)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class PatchEmbed(nn.Module):
    def __init__(self, geometry):
        super().__init__()
        self.proj = nn.Conv2d(geometry.in_channels, geometry.embed_dim, geometry.patch, stride=geometry.patch)
        self.norm = nn.LayerNorm(geometry.embed_dim)

    def forward(self, pixels):
        return self.norm(self.proj(pixels).flatten(2).transpose(1, 2))


class SwinTransformer(nn.Module):
    def __init__(self, geometry):
        super().__init__()
        self.geometry = geometry
        self.patch_embed = PatchEmbed(geometry)
        self.layers = nn.ModuleList(BasicLayer(geometry, stage) for stage in range(len(geometry.depths)))
        self.norm = nn.LayerNorm(geometry.features)

    def forward(self, pixels):
        """pixels [B, C, S, S] at the geometry's image size -> [B, 1 + r*r, features]: the mean of the final
        tokens in front of them, as RAM's encoder returns (its image-level token)."""
        size = self.geometry.image_size
        if pixels.shape[-2:] != (size, size):
            raise ValueError(f"the Swin encoder takes {size}x{size} images, not {tuple(pixels.shape[-2:])}")
        x = self.patch_embed(pixels)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        return torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
