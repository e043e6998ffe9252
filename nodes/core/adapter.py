"""The State-Aware Adapter (LiteVSR): conditions a frozen Wan DiT on the LR latent and the current clean estimate.

Shapes all derive from the backbone signature (diffusers style: config in, modules out). Two token streams are
patch-embedded exactly like the DiT's own input, so adapter tokens line up one to one with DiT tokens:
  structure stream  <- LR latent z_y          (static: what the video is)
  refinement stream <- clean estimate z0_hat  (dynamic: what the sampler currently believes)
Learnable query prototypes, modulated by the timestep, cross-attend to both streams inside local token windows
(the attention can move from structure at high noise to refinement at low noise). The result is injected into
every DiT block through zero-initialised projections, so a fresh adapter leaves the backbone's output unchanged.

A bounded memory of earlier chunks (LiftVSR's attention memory cache) is a third, optional stream: `remember` folds
each finished chunk's clean latents into MEMORY_SLOTS latent frames (moving averages at fixed half-lives), and the
queries attend to it through their own zero-initialised output projection, so an untrained memory changes nothing.
"""
import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from .geometry import BackboneSignature, round_up

INJECTION_MODES = ("direct", "shared_blocks")
TIME_FREQ_DIM = 256  # sinusoidal width, as Wan's own time embedding
# Half-lives, in latent frames (4 video frames each), of the memory's moving averages: the end of the last chunk,
# about the last chunk, and the last ~10 s of the shot. One memory slot each; the memory's size is fixed by this.
MEMORY_HALF_LIVES = (1, 8, 64)
MEMORY_SLOTS = len(MEMORY_HALF_LIVES)


@dataclass(frozen=True)
class AdapterConfig:
    backbone: BackboneSignature
    mode: str = "direct"  # "direct": adapter features injected per block; "shared_blocks": paper's batched branch
    rank: int = 0  # 0 = full-rank injection; r > 0 = LoRA-style low-rank injection
    width: int = 0  # adapter token width; 0 = backbone dim
    depth: int = 2  # cross-attention layers
    window: tuple = (1, 8, 8)  # query-prototype window in tokens (t, h, w), tiled over the token grid
    mlp_ratio: int = 2
    memory: bool = True  # queries also attend to the memory of earlier chunks (files from before it: False)

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
        fields.setdefault("memory", False)  # written before the memory existed: no memory weights in the file
        return cls(backbone=BackboneSignature(**backbone), **fields)

    def with_backbone(self, backbone):
        return replace(self, backbone=backbone)


def timestep_embedding(timestep, dim=TIME_FREQ_DIM):
    """Sinusoidal embedding of the DiT timestep (1000 * sigma), cos then sin, as Wan's."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=timestep.device, dtype=torch.float64) / half)
    angles = timestep.to(torch.float64)[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()


def remember(memory, clean_latent):
    """The memory [B, C, MEMORY_SLOTS, h, w] (float32) after a finished chunk's clean latents [B, C, T, h, w].

    Slot k is an exponential moving average over latent frames with half-life MEMORY_HALF_LIVES[k], updated frame by
    frame, so the result does not depend on how the video was cut into chunks, and its size not on the video's
    length. memory None (the start of a shot) starts every slot at the chunk's first frame."""
    clean_latent = clean_latent.float()
    frames = clean_latent.shape[2]
    if memory is None:
        memory = repeat(clean_latent[:, :, 0], "b c h w -> b c m h w", m=MEMORY_SLOTS)
    else:
        check_memory_shape(memory, clean_latent)
    decay = 0.5 ** (1 / torch.tensor(MEMORY_HALF_LIVES, dtype=torch.float64))
    age = torch.arange(frames - 1, -1, -1, dtype=torch.float64)  # the newest frame has age 0
    weights = ((1 - decay)[:, None] * decay[:, None] ** age).to(clean_latent)  # [slots, T]
    kept = (decay ** frames).to(clean_latent)
    return memory.float() * kept[:, None, None] + torch.einsum("bcthw,mt->bcmhw", clean_latent, weights)


def check_memory_shape(memory, latent):
    """A memory belongs to latents [B, C, T, h, w] of the same batch, channels and spatial size (a DiT tile crops
    both alike)."""
    batch, channels, _, h, w = latent.shape
    if memory.shape != (batch, channels, MEMORY_SLOTS, h, w):
        raise ValueError(f"memory {tuple(memory.shape)} does not fit latents {tuple(latent.shape)}: it must be "
                         f"[B, C, {MEMORY_SLOTS}, h, w] with their batch, channels and h, w")


def zero_linear(width_in, width_out):
    """A projection that starts at exactly zero: a new path added through it leaves the output bit for bit."""
    linear = nn.Linear(width_in, width_out)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


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

    def forward(self, queries, keys, key_mask, memory=None):
        """memory: (keys, key mask, zero-initialised output projection) of the memory stream, or None. Its own
        softmax, added after the streams' (as IP-Adapter's decoupled cross-attention), so that a zero projection
        leaves the result exact."""
        q = rearrange(self.to_q(self.norm_q(queries)), "b n (h d) -> b h n d", h=self.heads)
        queries = queries + self.to_out(self.attend(q, keys, key_mask))
        if memory is not None:
            memory_keys, memory_mask, memory_out = memory
            queries = queries + memory_out(self.attend(q, memory_keys, memory_mask))
        return queries + self.mlp(self.norm_mlp(queries))

    def attend(self, q, keys, key_mask):
        k, v = rearrange(self.to_kv(self.norm_kv(keys)), "b n (two h d) -> two b h n d", two=2, h=self.heads)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        return rearrange(attended, "b h n d -> b n (h d)")


class ChunkMemory(nn.Module):
    """The adapter's weights for the memory stream: a patch embedding like the other streams', key positions over
    (slot, window row, window column), and per layer a zero-initialised output projection."""

    def __init__(self, config):
        super().__init__()
        sig, width = config.backbone, config.width
        self.embed = nn.Conv3d(sig.latent_channels, width, kernel_size=sig.patch_size, stride=sig.patch_size)
        self.key_position = nn.Parameter(torch.randn(MEMORY_SLOTS * config.window[1] * config.window[2], width) * 0.02)
        self.out = nn.ModuleList(zero_linear(width, width) for _ in range(config.depth))

    def keys(self, memory, config, pad, time_windows):
        """(keys, key mask) of a memory [B, C, MEMORY_SLOTS, h, w] for each query window (b nt nh nw): all slots at
        the window's own rows and columns. `pad` is the query grid's (w, h, t) padding to whole windows."""
        slots = rearrange(memory, "b c m h w -> (b m) c 1 h w")  # each slot is one latent frame, embedded alone
        grid = rearrange(self.embed(pad_to_multiple(slots, config.backbone.patch_size)),
                         "(b m) d 1 h w -> b d m h w", m=MEMORY_SLOTS)

        def windows(tokens):
            return repeat(F.pad(tokens, pad[:4]), "b d m (nh wh) (nw ww) -> (b nt nh nw) (m wh ww) d",
                          nt=time_windows, wh=config.window[1], ww=config.window[2])

        return windows(grid) + self.key_position, windows(torch.ones_like(grid[:, :1]))[..., 0] > 0


class Injection(nn.Module):
    """Per-block projection into the DiT's residual stream, zero-initialised (full rank or low rank)."""

    def __init__(self, source_width, dim, rank):
        super().__init__()
        self.down = nn.Linear(source_width, rank, bias=False) if rank else None
        self.up = zero_linear(rank or source_width, dim)

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
        # Built last, so the other weights of a seeded adapter are those it had before the memory existed.
        self.memory = ChunkMemory(config) if config.memory else None

    @property
    def dtype(self):
        return self.query_prototypes.dtype

    def features(self, lr_latent, estimate, timestep, memory=None):
        """Adapter tokens [B, L, width] in the DiT's token order (t, h, w) for latents [B, C, T, H, W]; memory: the
        `remember`ed earlier chunks [B, C, MEMORY_SLOTS, H, W] of this shot, or None (a shot's first chunk)."""
        cfg = self.config
        if memory is not None:
            if self.memory is None:
                raise ValueError("this adapter has no memory of earlier chunks (config.memory is False: a file "
                                 "from before the memory, or built without it); call it with memory=None")
            check_memory_shape(memory, lr_latent)
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
        if memory is not None:
            memory_keys, memory_mask = self.memory.keys(memory.to(self.dtype), cfg, pad, padded[0] // cfg.window[0])
        for index, layer in enumerate(self.layers):
            queries = layer(queries, keys, key_mask,
                            None if memory is None else (memory_keys, memory_mask, self.memory.out[index]))
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
