"""Upscaling a video of any length chunk by chunk, with carried state, stitched and handed on as it goes.

`VSRPipeline.process` is the short-clip graph (encode LR -> sample -> decode -> crop -> colour) for one chunk; the
node graph runs the same steps once over the whole clip. `upscale_chunks` walks the chunks: each chunk of a
shot is sampled with the previous chunk's finished clean latents over their shared frames held as context
(`KnownFrames`, at the backbone's context noise level) and with the adapter's running memory of the chunks before
(`remember`, when the adapter has one), the decoded chunks are cross-faded over the overlap, and finished frames go
to `write` at once, so memory follows the chunk length, not the video length.
"""
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from .colour import correct_colour
from .frames import crop_to, pad_for_encode, resize_frames
from .geometry import TEMPORAL_STRIDE
from .oom import oom_stage
from .sampling import KnownFrames, sample_vsr, video_noise
from .temporal import Stitcher


@dataclass
class VSRPipeline:
    encode: Callable  # padded pixel frames [T, H, W, 3] -> LR latent in the model's space [1, C, T', h, w]
    denoise: Callable  # (x, sigma, lr_latent, estimate) -> x0, possibly spatially tiled
    decode: Callable  # clean latent in the model's space -> frames [T, H, W, 3] float32 on the CPU
    grid_px: int
    scale: int
    sigmas: torch.Tensor
    start: str = "noise"
    seed: int = 0
    colour: str = "lab"
    on_step: Optional[Callable] = None
    context_sigma: float = 0.0  # the backbone family's (backbones.Family.context_sigma)

    def process(self, frames, first_frame=0, known=None, memory=None):
        """LR frames [N, h, w, 3] starting at video frame `first_frame` -> (HR frames [N, s*h, s*w, 3], clean
        latents), given the carried state: `known` frames (shown at `context_sigma`) and the adapter's `memory`.
        The noise is keyed by video position, so a chunk sees the noise a whole-clip run would."""
        count, height, width = frames.shape[:3]
        out_height, out_width = self.scale * height, self.scale * width
        upscaled = resize_frames(frames[..., :3], out_height, out_width)
        with oom_stage("encode"):  # tells the memory planner's retry which size to shrink
            lr_latent = self.encode(pad_for_encode(upscaled, self.grid_px))
        noise = video_noise(lr_latent.shape, self.seed, first_frame).to(lr_latent)
        if known is not None:
            known = replace(known, sigma=self.context_sigma)
        with oom_stage("dit"):
            clean = sample_vsr(self.denoise, lr_latent, noise, self.sigmas, self.start, self.on_step, known,
                               memory=memory)
        with oom_stage("decode"):
            decoded = crop_to(self.decode(clean), count, out_height, out_width)
        return correct_colour(decoded, frames[..., :3], self.colour), clean


def carried_frames(previous_chunk, previous_latents, chunk, stride=TEMPORAL_STRIDE):
    """The previous chunk's clean latents over the frames both chunks share, as known frames of `chunk`.

    Chunk latent j >= 1 covers pixel frames up to chunk.start + stride * j; the previous chunk's latent k covers
    up to previous.start + stride * k (chunks start on the stride grid of their shot). Latent 0 is the chunk's
    anchor frame, coded alone, so it has no counterpart."""
    shared = (previous_chunk.stop - 1 - chunk.start) // stride
    if shared < 1:
        return None
    offset = (chunk.start - previous_chunk.start) // stride
    frames = tuple(range(1, shared + 1))
    return KnownFrames(frames, previous_latents[:, :, [offset + j for j in frames]])


def carries_state(chunks, index, segment_chunks=0):
    """Whether chunk `index` continues from the chunks before it (their known frames and memory): not at a new
    shot, and not at the start of a segment (every `segment_chunks` chunks when > 0) — segments are what several
    processes share out."""
    if index == 0 or chunks[index].new_shot:
        return False
    return not (segment_chunks and index % segment_chunks == 0)


def fresh_latents(latents, known):
    """A finished chunk's latents that the previous chunk did not already give: past its known frames, and past
    the anchor latent 0, which re-codes the first shared pixel frame (so the memory takes every frame once)."""
    return latents if known is None else latents[:, :, max(known.frames) + 1:]


def process_chunks(chunks, indices, chunk_frames, process, on_chunk=None, segment_chunks=0, remember=None):
    """Yields `(index, hr_frames)` for the chunks `indices` (consecutive, in order) of `chunks`, running
    `process(frames, first_frame, known, memory) -> (hr_frames, clean_latents)` on the LR frames `chunk_frames`
    yields for them. Where `carries_state` says so, a chunk gets the previous chunk's latents over the shared frames
    as known frames and the running memory `remember(memory, fresh_latents(...))` of the chunks before (from None
    at each restart; `remember=None`: the adapter keeps no memory, only known frames are carried)."""
    previous = memory = None
    for index, frames in zip(indices, chunk_frames):
        chunk = chunks[index]
        known = None
        if previous is None or not carries_state(chunks, index, segment_chunks):
            memory = None  # a new shot or segment starts from nothing, exactly where the known frames do
        else:
            known = carried_frames(*previous, chunk)
        hr_frames, latents = process(frames, chunk.start, known, memory)
        previous = (chunk, latents)
        if remember is not None:
            memory = remember(memory, fresh_latents(latents, known))
        if on_chunk is not None:
            on_chunk(index + 1, len(chunks))
        yield index, hr_frames


def upscale_chunks(chunks, chunk_frames, process, write, on_chunk=None, segment_chunks=0, remember=None):
    """Runs every chunk of `chunks` in one process and passes each finished HR frame batch to `write`."""
    stitcher = Stitcher(chunks)
    chunks_done = process_chunks(chunks, range(len(chunks)), chunk_frames, process, on_chunk, segment_chunks, remember)
    for _, hr_frames in chunks_done:
        write(stitcher.push(hr_frames))
    if not stitcher.done:
        raise RuntimeError(f"the video ended before all {len(chunks)} planned chunks were read")
