"""Long videos in chunks on the Wan causal-VAE grid: splitting into chunks, overlap blending, scene cuts.

How pixel frames map to latent frames. Wan's VAE is causal with temporal stride 4: latent 0 encodes pixel frame 0
alone; latent k (k >= 1) encodes pixel frames 4k-3 .. 4k. A chunk encoded on its own from pixel frame s = 4m
therefore has latent 0 <- pixel 4m alone (an "anchor", coded like a still image) and latent j <- pixels
4(m+j)-3 .. 4(m+j): exactly the global latent m+j. So chunks start on multiples of 4 (counted from the start of
their shot) and hold 4n+1 frames, which makes each end on frame 4(m+n), the last frame of a whole latent group.

Consecutive chunks share `overlap + 1` pixel frames: the later chunk's anchor frame, which is the last frame of a
latent group of the earlier chunk (the earlier chunk outputs it; the later one only uses it as context), then
`overlap` frames (a multiple of 4) that form overlap/4 whole latent frames in BOTH chunks and are cross-faded.
The chunk stride is therefore chunk_frames - 1 - overlap, a multiple of 4.

A scene cut starts a new shot: its first chunk starts on the cut, has no anchor and blends with nothing, and the
previous shot's last chunk ends at the cut.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .geometry import TEMPORAL_STRIDE, frames_on_grid


@dataclass(frozen=True)
class Chunk:
    """One chunk of a video. All numbers are global pixel-frame indices, ranges half-open."""

    start: int  # first frame read (the anchor, unless `new_shot`)
    stop: int  # one past the last frame read
    out_start: int  # first frame this chunk's output contributes to
    owned_stop: int  # frames [out_start, owned_stop) are final once this chunk is stitched
    fade_in: tuple  # this chunk's weights on frames out_start, out_start+1, ... against the previous chunk
    new_shot: bool  # first chunk of a shot: carried state (VAE cache, context latents) must be reset

    @property
    def frames(self):
        return range(self.start, self.stop)

    @property
    def owned(self):
        return range(self.out_start, self.owned_stop)

    @property
    def padded_frames(self):
        """4n+1 length the caller pads the chunk to (replicating its last frame) before encoding."""
        return frames_on_grid(self.stop - self.start)


def blend_weights(overlap):
    """Raised-cosine fade-in over `overlap` frames, strictly inside (0, 1). The fading-out chunk gets 1 - w, and
    since w[j] + w[overlap-1-j] = 1 the window is symmetric: neither chunk is favoured."""
    return tuple(0.5 - 0.5 * math.cos(math.pi * (j + 1) / (overlap + 1)) for j in range(overlap))


def _check_sizes(chunk_frames, overlap_frames, num_frames):
    if chunk_frames < 1 or (chunk_frames - 1) % TEMPORAL_STRIDE:
        raise ValueError(f"chunk_frames must be {TEMPORAL_STRIDE}n+1 (e.g. 33, 81), got {chunk_frames}")
    if overlap_frames < 0 or overlap_frames % TEMPORAL_STRIDE:
        raise ValueError(f"overlap_frames must be a multiple of {TEMPORAL_STRIDE}, got {overlap_frames}")
    if chunk_frames - 1 - overlap_frames < TEMPORAL_STRIDE and chunk_frames < num_frames:  # one chunk: no stride
        raise ValueError(f"overlap_frames {overlap_frames} leaves no new frames in a {chunk_frames}-frame chunk")


def _shot_chunks(shot_start, shot_stop, chunk_frames, overlap_frames):
    """(start, stop) of the chunks of one shot: starts every chunk_frames - 1 - overlap frames from the shot start,
    until a chunk reaches the end of the shot (that last one may be shorter)."""
    stride = chunk_frames - 1 - overlap_frames
    spans, start = [], shot_start
    while True:
        stop = min(start + chunk_frames, shot_stop)
        spans.append((start, stop))
        if stop == shot_stop:
            return spans
        start += stride


def split_chunks(num_frames, chunk_frames, overlap_frames, cuts=()):
    """Chunks covering `num_frames` pixel frames; every chunk is chunk_frames long (4n+1) except the last of each
    shot, which the caller pads to `padded_frames`. `cuts` are frames that start a new shot (see SceneCutDetector).
    Every frame is owned by exactly one chunk."""
    _check_sizes(chunk_frames, overlap_frames, num_frames)
    if num_frames < 1:
        raise ValueError("a video needs at least one frame")
    bounds = sorted({0, num_frames, *(cut for cut in cuts if 0 < cut < num_frames)})
    chunks = []
    for shot_start, shot_stop in zip(bounds, bounds[1:]):
        spans = _shot_chunks(shot_start, shot_stop, chunk_frames, overlap_frames)
        for index, (start, stop) in enumerate(spans):
            new_shot = index == 0
            # a later chunk gives its anchor frame to the previous chunk, then cross-fades the overlap
            out_start = start if new_shot else start + 1
            next_out_start = spans[index + 1][0] + 1 if index + 1 < len(spans) else stop
            fade_in = () if new_shot else blend_weights(overlap_frames)
            chunks.append(Chunk(start, stop, out_start, next_out_start, fade_in, new_shot))
    return chunks


class Stitcher:
    """Takes chunk outputs in order and returns, for each, the frames that just became final, in order.

    Holds only the previous chunk's cross-fade tail (at most `overlap` frames) between pushes. Blending uses
    lerp(previous, current, w), so frames on which both chunks agree come out bit-identical."""

    def __init__(self, chunks):
        self.chunks = chunks
        self._next = 0
        self._tail = None  # previous chunk's frames [owned_stop, stop), waiting for the next chunk's fade-in

    @property
    def held_frames(self):
        return 0 if self._tail is None else len(self._tail)

    @property
    def done(self):
        return self._next == len(self.chunks)

    def push(self, output):
        """`output`: the processed chunk, [n, ...] with n = len(chunk.frames) or its padded length."""
        if self.done:
            raise ValueError("all chunks were already stitched")
        chunk = self.chunks[self._next]
        if len(output) < len(chunk.frames):
            raise ValueError(f"chunk {self._next} needs {len(chunk.frames)} frames, got {len(output)}")
        frames = output[chunk.out_start - chunk.start: len(chunk.frames)]  # drop the anchor and the padding
        if chunk.fade_in:
            frames = torch.cat([self._cross_fade(frames, chunk.fade_in), frames[len(chunk.fade_in):]])
        owned = chunk.owned_stop - chunk.out_start
        self._tail = frames[owned:].clone()  # a copy, so the caller's chunk can be freed
        self._next += 1
        return frames[:owned]

    def _cross_fade(self, frames, fade_in):
        weights = torch.tensor(fade_in, dtype=frames.dtype, device=frames.device)
        weights = weights.view(-1, *([1] * (frames.ndim - 1)))
        return torch.lerp(self._tail.to(frames.device), frames[: len(fade_in)], weights)


# Mean absolute difference of consecutive 32x18 RGB thumbnails, pixel values on a 0..1 scale. In bigbuckbunny's
# own motion the score stays under 0.014; hard cuts between its shots or to other footage score 0.075 or more.
DEFAULT_CUT_THRESHOLD = 0.06
THUMBNAIL_SIZE = (18, 32)  # height, width: 16:9, small enough to ignore motion and noise, big enough for layout


def thumbnails(frames):
    """[n, H, W, 3] -> [n, 3, 18, 32] area averages."""
    return F.adaptive_avg_pool2d(frames.to(torch.float32).permute(0, 3, 1, 2), THUMBNAIL_SIZE)


class SceneCutDetector:
    """Decides whether a frame starts a new shot: the mean absolute difference between its thumbnail and the
    previous frame's exceeds `threshold` (0..1 pixel scale). Hard cuts only: a slow fade stays under it.

    Feed frames in order, each once; indices count every frame seen since construction or reset()."""

    def __init__(self, threshold=DEFAULT_CUT_THRESHOLD, enabled=True):
        self.threshold = threshold
        self.enabled = enabled
        self.reset()

    def reset(self):
        self._previous = None
        self.frames_seen = 0

    def scores(self, frames):
        """Change score of each frame against the one before it (0 for the very first frame)."""
        current = thumbnails(frames)
        previous = current[:1] if self._previous is None else self._previous
        before = torch.cat([previous, current[:-1]])
        self._previous = current[-1:]
        self.frames_seen += len(frames)
        return (current - before).abs().mean(dim=(1, 2, 3))

    def is_cut(self, frame):
        """Whether `frame` ([H, W, 3]) starts a new shot."""
        return bool(self.cut_points(frame[None]))

    def cut_points(self, frames):
        """Indices (counting all frames seen) of the frames in `frames` ([n, H, W, 3]) that start a new shot."""
        first = self.frames_seen
        scores = self.scores(frames)
        if not self.enabled:
            return []
        return [first + int(i) for i in torch.nonzero(scores > self.threshold).flatten()]
