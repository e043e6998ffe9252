"""Tile grids and feather weights, shared by the VAE decode (pixels) and the DiT spatial tiler (latents).

A grid covers [0, size) with tiles of a fixed length whose neighbours overlap by at least the requested amount.
Each tile is weighted by a raised-cosine ramp across the part it shares with a neighbour, 1 elsewhere; the
blend divides by the summed weights, so any overlap pattern reproduces a constant exactly.
"""
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Span:
    """One tile along one axis: [start, stop), ramping over the parts shared with the previous/next tile."""

    start: int
    stop: int
    ramp_before: int
    ramp_after: int

    @property
    def slice(self):
        return slice(self.start, self.stop)

    @property
    def length(self):
        return self.stop - self.start

    def scaled(self, factor):
        """The same span in units `factor` times finer (latent -> pixels)."""
        return Span(self.start * factor, self.stop * factor, self.ramp_before * factor, self.ramp_after * factor)


def tiles_along(size, tile, overlap):
    """How many tiles cover [0, size): the fewest whose neighbours can share >= `overlap`."""
    if tile <= 0 or not 0 <= overlap < tile:
        raise ValueError(f"need 0 <= overlap < tile, got tile {tile} and overlap {overlap}")
    return 1 if size <= tile else math.ceil((size - overlap) / (tile - overlap))


def tile_starts(size, tile, overlap):
    """Evenly spaced starts: first tile at 0, last flush with `size`, neighbours sharing >= `overlap`."""
    count = tiles_along(size, tile, overlap)
    if count == 1:
        return [0]
    # Integer spacing never exceeds tile - overlap, because the exact spacing (size - tile)/(count - 1) does not.
    return [index * (size - tile) // (count - 1) for index in range(count)]


def tile_spans(size, tile, overlap):
    """The spans along one axis; ramps cover the whole shared part, and none on the borders of the range."""
    starts = tile_starts(size, tile, overlap)
    stops = [min(start + tile, size) for start in starts]
    return [
        Span(
            start,
            stop,
            ramp_before=stops[index - 1] - start if index > 0 else 0,
            ramp_after=stop - starts[index + 1] if index + 1 < len(starts) else 0,
        )
        for index, (start, stop) in enumerate(zip(starts, stops))
    ]


def tile_grid(height, width, tile, overlap):
    """All (row span, column span) pairs of a 2-D grid, row-major."""
    return [(rows, cols) for rows in tile_spans(height, tile, overlap) for cols in tile_spans(width, tile, overlap)]


def feather_ramp(length, ramp_before, ramp_after, dtype=torch.float32):
    """1-D weights: raised cosine up over the first `ramp_before`, down over the last `ramp_after`, else 1.

    Samples sit at half steps, so every weight is > 0 and two equal ramps over the same pixels sum to 1.
    """
    weights = torch.ones(length, dtype=torch.float64)
    if ramp_before:
        weights[:ramp_before] *= _raised_cosine(ramp_before)
    if ramp_after:
        weights[length - ramp_after:] *= _raised_cosine(ramp_after).flip(0)
    return weights.to(dtype)


def _raised_cosine(length):
    phase = (torch.arange(length, dtype=torch.float64) + 0.5) / length
    return 0.5 - 0.5 * torch.cos(math.pi * phase)


def feather_window(rows, cols, dtype=torch.float32):
    """2-D weights `[rows.length, cols.length]` for one tile of a grid."""
    row_weights = feather_ramp(rows.length, rows.ramp_before, rows.ramp_after, dtype)
    col_weights = feather_ramp(cols.length, cols.ramp_before, cols.ramp_after, dtype)
    return torch.outer(row_weights, col_weights)


class FeatherBlender:
    """Blends weighted tiles as a running weighted mean.

    Each tile is merged with `lerp(current, tile, w / (w_sum + w))`, so wherever all tiles agree the result equals
    them bit for bit (a spatially local model is reproduced exactly, not just to rounding). `height_dim` and
    `width_dim` say where the tiled axes are, so one blender serves `[T, H, W, C]` frames and `[B, C, T, h, w]`
    latents alike.
    """

    def __init__(self, shape, height_dim, width_dim, dtype=torch.float32, device="cpu"):
        self.height_dim = height_dim % len(shape)
        self.width_dim = width_dim % len(shape)
        self.blend = torch.zeros(shape, dtype=dtype, device=device)
        self.weight_sum = torch.zeros(shape[self.height_dim], shape[self.width_dim], dtype=dtype, device=device)

    def _broadcastable(self, window):
        view = [1] * self.blend.ndim
        view[self.height_dim], view[self.width_dim] = window.shape
        return window.reshape(view)

    def _region(self, rows, cols):
        index = [slice(None)] * self.blend.ndim
        index[self.height_dim], index[self.width_dim] = rows.slice, cols.slice
        return tuple(index)

    def add(self, tile, rows, cols):
        window = feather_window(rows, cols, self.blend.dtype).to(self.blend.device)
        weight_sum = self.weight_sum[rows.slice, cols.slice] + window
        region = self._region(rows, cols)
        self.blend[region] = torch.lerp(self.blend[region], tile.to(self.blend), self._broadcastable(window / weight_sum))
        self.weight_sum[rows.slice, cols.slice] = weight_sum

    def result(self):
        return self.blend
