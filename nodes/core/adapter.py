"""The State-Aware Adapter (LiteVSR): conditions a frozen Wan DiT on the LR latent and the current clean estimate.

Shapes all derive from the backbone signature (diffusers style: config in, modules out). Two token streams are
patch-embedded exactly like the DiT's own input, so adapter tokens line up one to one with DiT tokens:
  structure stream  <- LR latent z_y          (static: what the video is)
  refinement stream <- clean estimate z0_hat  (dynamic: what the sampler currently believes)
Learnable query prototypes, modulated by the timestep, cross-attend to both streams inside local token windows
(the attention can move from structure at high noise to refinement at low noise). The result is injected into
every DiT block through zero-initialised projections, so a fresh adapter leaves the backbone's output unchanged.
"""
import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .geometry import BackboneSignature, round_up

INJECTION_MODES = ("direct", "shared_blocks")
TIME_FREQ_DIM = 256  # sinusoidal width, as Wan's own time embedding


@dataclass(frozen=True)
class AdapterConfig:
    backbone: BackboneSignature
    mode: str = "direct"  # "direct": adapter features injected per block; "shared_blocks": paper's batched branch
    rank: int = 0  # 0 = full-rank injection; r > 0 = LoRA-style low-rank injection
    width: int = 0  # adapter token width; 0 = backbone dim
    depth: int = 2  # cross-attention layers
    window: tuple = (1, 8, 8)  # query-prototype window in tokens (t, h, w), tiled over the token grid
    mlp_ratio: int = 2

    def __post_init__(self):
        if self.mode not in INJECTION_MODES:
            raise ValueError(f"unknown injection mode {self.mode!r}; use one of {INJECTION_MODES}")
        if self.width == 0:
            object.__setattr__(self, "width", self.backbone.dim)
        if self.rank < 0 or self.depth < 1 or self.width % 64:
            raise ValueError(f"invalid adapter config: rank {self.rank}, depth {self.depth}, width {self.width}")
        object.__setattr__(self, "window", tuple(self.window))

    @property
    def heads(self):
        return max(1, self.width // 128)

    def to_dict(self):
        fields = asdict(self)
        fields["backbone"] = asdict(self.backbone)
        return fields

    @classmethod
    def from_dict(cls, fields):
        fields = dict(fields)
        backbone = dict(fields.pop("backbone"))
        backbone["patch_size"] = tuple(backbone["patch_size"])
        return cls(backbone=BackboneSignature(**backbone), **fields)

    def with_backbone(self, backbone):
        return replace(self, backbone=backbone)


def timestep_embedding(timestep, dim=TIME_FREQ_DIM):
    """Sinusoidal embedding of the DiT timestep (1000 * sigma), cos then sin, as Wan's."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=timestep.device, dtype=torch.float64) / half)
    angles = timestep.to(torch.float64)[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()


def pad_to_multiple(latent, multiple):
    """Replicate-pad [B, C, T, H, W] at the end of each axis so the patch embedding sees what the DiT sees."""
    pad = []
    for size, step in zip(reversed(latent.shape[2:]), reversed(multiple)):
        pad += [0, round_up(size, step) - size]
    return F.pad(latent, pad, mode="replicate") if any(pad) else latent


class WindowCrossAttention(nn.Module):
    """Queries attend to the keys of their own window; keys from padded positions are masked out."""

    def __init__(self, width, heads, mlp_ratio):
        super().__init__()
        self.heads = heads
        self.norm_q = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(width)
        self.to_q = nn.Linear(width, width)
        self.to_kv = nn.Linear(width, 2 * width)
        self.to_out = nn.Linear(width, width)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * width, width))

    def forward(self, queries, keys, key_mask):
        q = rearrange(self.to_q(self.norm_q(queries)), "b n (h d) -> b h n d", h=self.heads)
        k, v = rearrange(self.to_kv(self.norm_kv(keys)), "b n (two h d) -> two b h n d", two=2, h=self.heads)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        queries = queries + self.to_out(rearrange(attended, "b h n d -> b n (h d)"))
        return queries + self.mlp(self.norm_mlp(queries))


class Injection(nn.Module):
    """Per-block projection into the DiT's residual stream, zero-initialised (full rank or low rank)."""

    def __init__(self, source_width, dim, rank):
        super().__init__()
        self.down = nn.Linear(source_width, rank, bias=False) if rank else None
        self.up = nn.Linear(rank or source_width, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, tokens):
        return self.up(self.down(tokens) if self.down is not None else tokens)


class StateAwareAdapter(nn.Module):
    distilled = None  # the distillation record of the file it was loaded from (core/adapter_file.py), if any

    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.config = config
        sig, width = config.backbone, config.width
        window_tokens = math.prod(config.window)
        self.structure_embed = nn.Conv3d(sig.latent_channels, width, kernel_size=sig.patch_size, stride=sig.patch_size)
        self.refine_embed = nn.Conv3d(sig.latent_channels, width, kernel_size=sig.patch_size, stride=sig.patch_size)
        # Keys need to know where in the window and in which stream they sit; queries are position-specific.
        self.key_position = nn.Parameter(torch.randn(window_tokens, width) * 0.02)
        self.stream_embedding = nn.Parameter(torch.randn(2, width) * 0.02)
        self.query_prototypes = nn.Parameter(torch.randn(window_tokens, width) * 0.02)
        self.time_modulation = nn.Sequential(nn.Linear(TIME_FREQ_DIM, width), nn.SiLU(), nn.Linear(width, 2 * width))
        self.layers = nn.ModuleList(WindowCrossAttention(width, config.heads, config.mlp_ratio)
                                    for _ in range(config.depth))
        self.out_norm = nn.LayerNorm(width)
        if config.mode == "shared_blocks":
            # The condition branch starts as the DiT's own tokens plus the adapter features (as VACE hints do),
            # then runs through the frozen blocks batched with the main branch.
            self.condition_in = nn.Linear(width, sig.dim)
            source_width = sig.dim
        else:
            source_width = width
        self.injections = nn.ModuleList(Injection(source_width, sig.dim, config.rank) for _ in range(sig.num_layers))

    @property
    def dtype(self):
        return self.query_prototypes.dtype

    def features(self, lr_latent, estimate, timestep):
        """Adapter tokens [B, L, width] in the DiT's token order (t, h, w) for latents [B, C, T, H, W]."""
        cfg = self.config
        lr_latent, estimate = (pad_to_multiple(z.to(self.dtype), cfg.backbone.patch_size) for z in (lr_latent, estimate))
        structure = self.structure_embed(lr_latent)
        refine = self.refine_embed(estimate)
        batch, _, t, h, w = structure.shape
        padded = [round_up(size, win) for size, win in zip((t, h, w), cfg.window)]
        pad = (0, padded[2] - w, 0, padded[1] - h, 0, padded[0] - t)
        occupied = torch.ones(batch, 1, t, h, w, device=structure.device, dtype=structure.dtype)

        def windows(grid):
            return rearrange(F.pad(grid, pad), "b d (nt wt) (nh wh) (nw ww) -> (b nt nh nw) (wt wh ww) d",
                             wt=cfg.window[0], wh=cfg.window[1], ww=cfg.window[2])

        keys = torch.cat([windows(structure) + self.key_position + self.stream_embedding[0],
                          windows(refine) + self.key_position + self.stream_embedding[1]], dim=1)
        key_mask = (windows(occupied)[..., 0] > 0).repeat(1, 2)  # padding keys never attended

        scale, shift = self.time_modulation(timestep_embedding(timestep.flatten()).to(self.dtype)).chunk(2, dim=-1)
        windows_per_sample = keys.shape[0] // batch
        scale = scale.repeat_interleave(windows_per_sample, dim=0)[:, None]
        shift = shift.repeat_interleave(windows_per_sample, dim=0)[:, None]
        queries = self.query_prototypes * (1 + scale) + shift
        for layer in self.layers:
            queries = layer(queries, keys, key_mask)
        tokens = rearrange(queries, "(b nt nh nw) (wt wh ww) d -> b (nt wt) (nh wh) (nw ww) d", b=batch,
                           nt=padded[0] // cfg.window[0], nh=padded[1] // cfg.window[1], wt=cfg.window[0],
                           wh=cfg.window[1])
        return self.out_norm(rearrange(tokens[:, :t, :h, :w], "b t h w d -> b (t h w) d"))

    def condition_tokens(self, dit_tokens, features):
        """Start of the shared-blocks condition branch: the DiT tokens plus projected adapter features."""
        return dit_tokens + self.condition_in(features).to(dit_tokens.dtype)

    def inject(self, block_index, source_tokens):
        return self.injections[block_index](source_tokens.to(self.dtype))


def trainable_parameters(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
