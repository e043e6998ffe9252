"""Causal streaming, InfVSR's way (arXiv 2510.00948): chunks in order, one step each, with a rolling cache of
the previous chunks' self-attention keys and values instead of overlapping chunks.

A chunk's tokens attend to themselves and to the cached keys/values of the last `cache_frames` latent frames
before it; RoPE time positions keep counting across chunks. So a stream of chunks computes exactly what one pass
over the whole clip computes when every token may see its own chunk and the `cache_frames` frames before it (a
block-banded attention mask): each earlier chunk's keys are the ones that pass computed for it, layer by layer.
Memory stays that of one chunk plus the bounded cache, whatever the video's length.

One step from the LR latent (InfVSR): x is the LR latent itself, the DiT sees timestep 399, and the update uses
the sigma of InfVSR's shift-5 grid nearest that timestep: restored = x - sigma * v.
"""
from dataclasses import dataclass

import torch

from .geometry import TEMPORAL_STRIDE, frames_on_grid, round_up
from .sampling import shift_sigma
from .temporal import Chunk

INFVSR_TIMESTEP = 399
INFVSR_SHIFT = 5.0
TRAIN_TIMESTEPS = 1000
FIRST_CHUNK_FRAMES = 9  # pixel frames: 1 + 2 x 4 -> 3 latent frames
NEXT_CHUNK_FRAMES = 12  # 3 x 4 -> 3 latent frames
CACHE_LATENT_FRAMES = 3  # the previous chunk's latent frames


def grid_sigma(timestep=INFVSR_TIMESTEP, shift=INFVSR_SHIFT, steps=TRAIN_TIMESTEPS):
    """The sigma on the shifted training grid (`steps` values, sigma(u) = shift*u / (1 + (shift-1)*u), u from 1 down
    in steps of 1/steps) whose timestep (sigma * steps) is nearest `timestep`: 0.398501 for 399 at shift 5."""
    u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32)[:-1]
    sigmas = shift_sigma(u, shift)
    return float(sigmas[torch.argmin((sigmas * steps - timestep).abs())])


def one_step(latent, velocity, sigma):
    """InfVSR's update from the LR latent: restored = latent - sigma * v."""
    return latent - sigma * velocity


@dataclass(frozen=True)
class CausalPlan:
    first_frames: int = FIRST_CHUNK_FRAMES
    next_frames: int = NEXT_CHUNK_FRAMES
    cache_frames: int = CACHE_LATENT_FRAMES  # latent frames of keys/values a chunk sees before its own

    def __post_init__(self):
        if self.first_frames % TEMPORAL_STRIDE != 1 or self.next_frames % TEMPORAL_STRIDE or self.next_frames < 1:
            raise ValueError(f"causal chunks must be 4n+1 frames first and 4n after (got {self.first_frames}, "
                             f"{self.next_frames}): they have to start on the causal VAE's frame groups")
        if self.cache_frames < 0:
            raise ValueError("cache_frames must be 0 or more")


def causal_chunks(num_frames, cuts=(), plan=CausalPlan()):
    """Consecutive, non-overlapping chunks covering `num_frames`: each shot (cuts start new ones) opens with a
    `first_frames` chunk, then `next_frames` chunks; a shot's last chunk may be shorter (the caller pads it).
    Every frame belongs to exactly one chunk, so the output needs no blending."""
    if num_frames < 1:
        raise ValueError("a video needs at least one frame")
    bounds = sorted({0, num_frames, *(cut for cut in cuts if 0 < cut < num_frames)})
    chunks = []
    for shot_start, shot_stop in zip(bounds, bounds[1:]):
        start, size = shot_start, plan.first_frames
        while start < shot_stop:
            stop = min(start + size, shot_stop)
            chunks.append(Chunk(start, stop, start, stop, (), start == shot_start))
            start, size = stop, plan.next_frames
    return chunks


def padded_length(count, first):
    """Frames a causal chunk is padded to: 4n+1 for a shot's first chunk, 4n after (the VAE's frame groups)."""
    return frames_on_grid(count) if first else round_up(count, TEMPORAL_STRIDE)


class RollingKV:
    """Per DiT block, the self-attention keys and values of the last `frames` latent frames of finished chunks.

    During a chunk `attend_keys` returns the cached keys/values followed by the chunk's own and holds the chunk's
    as pending; `advance` (after the chunk) makes them the cache, trimmed to `frames` latent frames, so the cache
    never grows beyond that. Keys are stored after RoPE, at their absolute time positions."""

    def __init__(self, frames=CACHE_LATENT_FRAMES):
        self.frames = frames
        self.position = 0  # latent frames finished in this shot: the next chunk's first RoPE time position
        self.tokens_per_frame = None
        self._cache = {}
        self._pending = {}

    def begin_chunk(self, tokens_per_frame):
        if self.tokens_per_frame not in (None, tokens_per_frame):
            raise ValueError("the frame size changed within a shot")
        self.tokens_per_frame = tokens_per_frame
        self._pending = {}

    def attend_keys(self, block, k, v):
        """(keys, values) block `block` attends with: the cache's, then this chunk's [B, S, C]."""
        self._pending[block] = (k, v)
        if block not in self._cache:
            return k, v
        old_k, old_v = self._cache[block]
        return torch.cat([old_k, k], dim=1), torch.cat([old_v, v], dim=1)

    def advance(self, latent_frames):
        keep = self.frames * self.tokens_per_frame
        for block, (k, v) in self._pending.items():
            if block in self._cache:
                old_k, old_v = self._cache[block]
                k, v = torch.cat([old_k, k], dim=1), torch.cat([old_v, v], dim=1)
            self._cache[block] = (k[:, -keep:].clone(), v[:, -keep:].clone()) if keep else None
        self._cache = {block: kv for block, kv in self._cache.items() if kv is not None}
        self._pending = {}
        self.position += latent_frames

    def nbytes(self):
        return sum(t.numel() * t.element_size() for kv in self._cache.values() for t in kv)


def upscale_causal(chunks, chunk_frames, process, write, on_chunk=None):
    """Runs `process(frames, chunk) -> hr_frames` on every chunk in order and writes each result at once (the
    chunks do not overlap, so every output frame is final when its chunk is)."""
    done = 0
    for chunk, frames in zip(chunks, chunk_frames):
        write(process(frames, chunk))
        done += 1
        if on_chunk is not None:
            on_chunk(done, len(chunks))
    if done != len(chunks):
        raise RuntimeError(f"the video ended before all {len(chunks)} planned chunks were read")
