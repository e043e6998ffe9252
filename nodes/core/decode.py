"""Spatially tiled VAE decode that keeps the time axis in one pass.

Each spatial tile is decoded over all frames in a single call, so a causal video VAE keeps its temporal cache
from the first latent frame to the last. Temporal tiling (as ComfyUI's VAEDecodeTiled does past 64 frames)
restarts that cache in every tile and leaves visible temporal seams.
"""
import torch

from .tiling import FeatherBlender, tile_grid, tiles_along


def decode_latent_tiling(tile_px, overlap_px, spatial_stride):
    """Pixel tile/overlap -> latent units, refusing settings that cannot be honoured exactly."""
    if tile_px % spatial_stride or overlap_px % spatial_stride:
        raise ValueError(f"tile size ({tile_px} px) and overlap ({overlap_px} px) must be multiples of the VAE's "
                         f"spatial stride ({spatial_stride} px); round them to a multiple of {spatial_stride}")
    if overlap_px < 0:
        raise ValueError(f"overlap must be >= 0 px, got {overlap_px}")
    if tile_px <= overlap_px:
        raise ValueError(f"tile size ({tile_px} px) must be larger than the overlap ({overlap_px} px); "
                         "raise the tile size or lower the overlap")
    return tile_px // spatial_stride, overlap_px // spatial_stride


def tile_count(latent_height, latent_width, spatial_stride, tile_px, overlap_px):
    """How many decode calls `tiled_decode` makes (for progress bars), without building the grid."""
    tile, overlap = decode_latent_tiling(tile_px, overlap_px, spatial_stride)
    return tiles_along(latent_height, tile, overlap) * tiles_along(latent_width, tile, overlap)


def tiled_decode(latent, decode_fn, spatial_stride, tile_px, overlap_px, on_tile=None):
    """Decode `latent [1, C, T', h, w]` to frames `[T, h*stride, w*stride, 3]`, float32 on the CPU.

    `decode_fn(latent_tile)` returns `[T, th, tw, 3]` on any device; every tile moves to the CPU at once, so
    device memory follows the tile size. `on_tile(done, total)` runs after each tile.
    """
    tile, overlap = decode_latent_tiling(tile_px, overlap_px, spatial_stride)
    if latent.ndim != 5 or latent.shape[0] != 1:
        raise ValueError(f"expected one video latent [1, C, T, h, w], got shape {tuple(latent.shape)}")
    latent_height, latent_width = latent.shape[-2:]
    tiles = tile_grid(latent_height, latent_width, tile, overlap)
    blender = None
    for done, (rows, cols) in enumerate(tiles, start=1):
        pixels = _decode_tile(latent, decode_fn, rows, cols, spatial_stride)
        if len(tiles) == 1:  # the whole latent fits in one tile: a plain decode, nothing to blend
            blended = pixels
        else:
            if blender is None:
                shape = (pixels.shape[0], latent_height * spatial_stride, latent_width * spatial_stride,
                         pixels.shape[-1])
                blender = FeatherBlender(shape, height_dim=1, width_dim=2)
            blender.add(pixels, rows.scaled(spatial_stride), cols.scaled(spatial_stride))
        if on_tile is not None:
            on_tile(done, len(tiles))
    return blended if blender is None else blender.result()


def _decode_tile(latent, decode_fn, rows, cols, spatial_stride):
    pixels = decode_fn(latent[..., rows.slice, cols.slice]).to("cpu", torch.float32)
    expected = (rows.length * spatial_stride, cols.length * spatial_stride)
    if tuple(pixels.shape[1:3]) != expected:
        raise ValueError(f"decode_fn returned {tuple(pixels.shape[1:3])} px for a latent tile that should give "
                         f"{expected} px; is spatial_stride ({spatial_stride}) the VAE's?")
    return pixels
