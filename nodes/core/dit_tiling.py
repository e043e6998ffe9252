"""Spatial tiling of the DiT denoiser, so 2K/4K latents run in tiles near the backbone's training resolution.

`tiled_denoiser(denoise, tile, overlap)` wraps the sampler's `denoise(x, sigma, lr_latent, estimate[, carried])
-> x0` callable (see `sampling.py`) in one with the same signature. It crops `x`, `lr_latent`, `estimate`
(`[B, C, T, h, w]` latents) and the carried memory (`[B, C, M, h, w]`, on the same grid) to the same spatial tiles,
passes the carried per-frame noise levels through as they are, calls `denoise` on each, and blends the clean estimates
with `FeatherBlender` (raised-cosine ramps over the shared parts). The sampler is untouched: it still runs its
Euler steps on the full latent, so after every step the tiles see each other's blended result, and the adapter's
refinement stream reads the blended estimate.

Units: tile sizes and overlaps are in LATENT units. Every tile starts on a multiple of `multiple` (the DiT's
spatial patch, 2 for every Wan) and is a whole number of patches long, so the tile's token grid is a sub-grid of
the whole latent's token grid: a token never straddles a tile edge. A latent with an odd side (the pack's encode
node never makes one) is first padded to whole patches the way the untiled call pads it (`pad_to_patch`), and
the padding is cropped off the blend.

Noise: the sampler draws the noise once at full size (`seeded_noise(lr_latent.shape, seed)`) before any tiling,
and the tiler only crops views of the full state. Overlapping tiles therefore see the *same* noise over the part
they share (and the same LR latent and estimate), so their predictions there agree up to the effect of the
different attention context, never because of different random draws; drawing noise per tile would give two
different samples in every overlap and the blend would ghost. It also keeps the seed's meaning: the same seed
gives the same noise field whatever the tile settings, and for a spatially local model tiled and untiled
sampling are bit-identical (FeatherBlender blends agreeing tiles exactly).

What tiling changes: Wan's self-attention is global, so a token in a tile attends only to its own tile; RoPE
positions restart at each tile's corner (as for a training crop). Matching the tile to the training resolution
(`training_tile`) keeps each call in the regime the DiT was trained on; the overlap plus the per-step blending
hides the remaining disagreement at tile edges.

Pure torch; imports nothing of ComfyUI.
"""
import math
from dataclasses import replace

import torch.nn.functional as F

from .backbones import training_release
from .geometry import WAN_PATCH, BackboneSignature, round_up
from .tiling import FeatherBlender, Span, tile_spans

PATCH = WAN_PATCH[1]  # spatial patch of every Wan DiT (square)
DEFAULT_OVERLAP_FRACTION = 1 / 8


def _pair(value, name):
    """An int (square) or an (height, width) pair -> (height, width) of ints."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be one int or a (height, width) pair, got {value!r}")
        pair = tuple(value)
    else:
        pair = (value, value)
    for item in pair:
        if isinstance(item, bool) or not isinstance(item, int):
            raise ValueError(f"{name} must be whole numbers, got {value!r}")
    return pair


def patch_multiple(signature: BackboneSignature):
    """Latent alignment of DiT tiles: the spatial patch (2 for every Wan)."""
    _, patch_h, patch_w = signature.patch_size
    if patch_h != patch_w:
        raise ValueError(f"non-square patch {signature.patch_size} is not supported by the DiT tiler")
    return patch_h


def training_tile(signature: BackboneSignature, height=None, width=None):
    """Default DiT tile `(height, width)` in latent units: the backbone's training resolution (its release in the
    backbone registry, `backbones.training_release`) / VAE stride.

    Wan2.1-1.3B 832x480 px -> (60, 104); Wan2.1-14B 1280x720 -> (90, 160); Wan2.2-TI2V-5B 1280x704 at stride 16
    -> (44, 80). The published resolutions are landscape; pass the latent `height` and `width` and a portrait
    latent gets the tile turned to portrait too (Wan is trained on both orientations).
    """
    width_px, height_px = training_release(signature).training_px
    stride, multiple = signature.vae_stride, patch_multiple(signature)
    if height_px % (stride * multiple) or width_px % (stride * multiple):  # a release registered off its grid
        raise ValueError(f"training resolution {width_px}x{height_px} px is off the {stride * multiple} px grid")
    tile = (height_px // stride, width_px // stride)
    if height is not None and width is not None and height > width:
        tile = tile[::-1]
    return tile


def default_overlap(tile, multiple=2):
    """1/8 of the tile per axis, rounded to the nearest multiple (at least one multiple).

    Why 1/8: the overlap must be several tokens wide, so the raised-cosine ramp hands over gradually and the
    tokens next to a tile edge (those whose attention context is cut hardest) carry little weight; a wider
    overlap buys little more, since with global attention the whole tile differs a little from the untiled
    call, while the cost grows as (tile / (tile - overlap))^2 in DiT calls: 1/8 costs about 1.31x the untiled
    compute (1/4 would cost 1.78x). It is also the ratio the decode node defaults to (512 px tiles, 64 px
    overlap). For the Wan2.1-1.3B tile (60, 104) this is (8, 14) latents = 64 x 112 px.
    """
    tile = _pair(tile, "tile")
    return tuple(max(multiple, math.floor(size * DEFAULT_OVERLAP_FRACTION / multiple + 0.5) * multiple)
                 for size in tile)


def latent_tiling(signature: BackboneSignature, tile_px, overlap_px=None):
    """Pixel tile/overlap (an int or a (height, width) pair each) -> `(tile, overlap)` latent pairs for the DiT.

    Both must be multiples of the DiT grid (`signature.grid_px`: 16 px for Wan2.1, 32 px for Wan2.2) so tiles
    start and end on whole tokens. `overlap_px=None` takes `default_overlap`.
    """
    grid, stride, multiple = signature.grid_px, signature.vae_stride, patch_multiple(signature)
    tile_px = _pair(tile_px, "tile size")
    for size in tile_px:
        if size <= 0:
            raise ValueError(f"DiT tile size must be positive, got {size} px")
        if size % grid:
            low = max(grid, size // grid * grid)
            raise ValueError(f"DiT tile size {size} px is not a multiple of the {signature.family} DiT grid "
                             f"({grid} px = VAE stride {stride} x patch {multiple}); use {low} or {low + grid} px")
    tile = tuple(size // stride for size in tile_px)
    if overlap_px is None:
        return tile, default_overlap(tile, multiple)
    overlap_px = _pair(overlap_px, "overlap")
    for size, overlap in zip(tile_px, overlap_px):
        if overlap < 0:
            raise ValueError(f"DiT tile overlap must be 0 or more, got {overlap} px")
        if overlap % grid:
            low = overlap // grid * grid
            raise ValueError(f"DiT tile overlap {overlap} px is not a multiple of the {signature.family} DiT grid "
                             f"({grid} px); use {low} or {low + grid} px")
        if overlap >= size:
            raise ValueError(f"DiT tile overlap ({overlap} px) must be smaller than the tile ({size} px); "
                             "raise the tile size or lower the overlap")
    return tile, tuple(size // stride for size in overlap_px)


def pad_to_patch(x, *adapter_inputs, patch=PATCH):
    """Pad an odd-sized latent to whole patches before tiling, exactly as the untiled call pads it; returns x and
    the adapter's inputs (LR latent, estimate, memory: None stays None) padded.

    ComfyUI's WanModel pads x circularly (`pad_to_patch_size`) and the adapter pads its inputs by replication
    (`adapter.pad_to_multiple`). Padding the full latent the same way first means the border tile sees the same
    half-padded border tokens as the whole; clipping the tile instead would let the DiT wrap the tile's own first
    column into the border token. The padded part is cropped off after blending."""
    height, width = x.shape[-2:]
    pad = (0, round_up(width, patch) - width, 0, round_up(height, patch) - height, 0, 0)
    if not any(pad):
        return (x, *adapter_inputs)
    return (F.pad(x, pad, mode="circular"),
            *(None if other is None else F.pad(other, pad, mode="replicate") for other in adapter_inputs))


def _check_tiling(tile, overlap, multiple):
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple must be a positive int (the DiT patch size), got {multiple!r}")
    tile, overlap = _pair(tile, "tile"), _pair(overlap, "overlap")
    for axis, size, shared in zip(("height", "width"), tile, overlap):
        if size < multiple or size % multiple:
            low = max(multiple, size // multiple * multiple)
            raise ValueError(f"DiT tile {axis} {size} (latent) must be a positive multiple of the patch size "
                             f"{multiple} so tokens do not straddle tiles; use {low} or {low + multiple}")
        if shared < 0 or shared % multiple:
            low = max(0, shared // multiple * multiple)
            raise ValueError(f"DiT tile overlap {shared} (latent, {axis}) must be 0 or a multiple of the patch size "
                             f"{multiple}; use {low} or {low + multiple}")
        if shared >= size:
            raise ValueError(f"DiT tile overlap {shared} must be smaller than the tile {axis} {size} (latent); "
                             "raise the tile size or lower the overlap")
    return tile, overlap


def aligned_spans(size, tile, overlap, multiple=2):
    """`tile_spans` on the patch grid: starts on multiples of `multiple`, lengths `tile` (clipped to `size`).

    The grid is made in whole patches (an odd `size` counts its last, partial patch as one), then scaled back
    to latent units; at an odd border the last tile is clipped to `size` (`tiled_denoiser` pads the latent to
    whole patches first, so its tiles are never clipped).
    """
    (tile, _), (overlap, _) = _check_tiling((tile, tile), (overlap, overlap), multiple)
    if size < 1:
        raise ValueError(f"cannot tile an empty axis (size {size})")
    patches = -(-size // multiple)
    spans = [span.scaled(multiple) for span in tile_spans(patches, tile // multiple, overlap // multiple)]
    last = spans[-1]
    spans[-1] = Span(last.start, min(last.stop, size), last.ramp_before, last.ramp_after)
    return spans


def dit_tile_grid(height, width, tile, overlap=None, multiple=2):
    """All (row span, column span) pairs for a latent of `height x width`, row-major.

    `tile` and `overlap` are latent units, an int or a (height, width) pair; `overlap=None` is `default_overlap`.
    """
    if overlap is None:
        overlap = default_overlap(tile, multiple)
    (tile_h, tile_w), (overlap_h, overlap_w) = _check_tiling(tile, overlap, multiple)
    rows = aligned_spans(height, tile_h, overlap_h, multiple)
    cols = aligned_spans(width, tile_w, overlap_w, multiple)
    return [(row, col) for row in rows for col in cols]


def tiled_denoiser(denoise, tile, overlap=None, multiple=2, on_tile=None):
    """`denoise(x, sigma, lr_latent, estimate[, carried]) -> x0`, run in spatial tiles and feather-blended.

    `tile`/`overlap`: latent units, an int or (height, width); `overlap=None` takes `default_overlap`.
    `multiple`: tile alignment, the DiT patch (`patch_multiple(signature)`). Passing the adapter's window in
    latent units instead (patch x window, 16 by default) also puts the adapter's local windows on the
    untiled window grid (windows cut by a tile edge still differ). `on_tile(done, total)` runs after every tile
    call (progress, interruption).

    A latent that fits in one tile is passed to `denoise` whole and its result returned as is (same object).
    The blended x0 has the dtype and device of the first tile's output.
    """
    if overlap is None:
        overlap = default_overlap(tile, multiple)
    tile, overlap = _check_tiling(tile, overlap, multiple)
    if multiple % PATCH:
        raise ValueError(f"multiple {multiple} must be a multiple of the Wan DiT patch ({PATCH}) so tokens do not "
                         f"straddle tiles; use {round_up(multiple, PATCH)}")

    def tiled(x, sigma, lr_latent, estimate, carried=None):
        if x.ndim != 5:
            raise ValueError(f"expected latents [B, C, T, h, w], got x of shape {tuple(x.shape)}")
        for name, other in (("lr_latent", lr_latent), ("estimate", estimate)):
            if other.shape[0] != x.shape[0] or other.shape[-3:] != x.shape[-3:]:
                raise ValueError(f"{name} {tuple(other.shape)} does not match x {tuple(x.shape)} in batch, "
                                 "frames or size; the DiT tiler crops all three alike")
        memory = None if carried is None else carried.memory
        if memory is not None and (memory.shape[0] != x.shape[0] or memory.shape[-2:] != x.shape[-2:]):
            raise ValueError(f"the carried memory {tuple(memory.shape)} does not match x {tuple(x.shape)} in batch or "
                             "size; the DiT tiler crops it like the latent")
        height, width = x.shape[-2:]
        if len(grid_for(height, width)) == 1:
            x0 = denoise(x, sigma, lr_latent, estimate, *([] if carried is None else [carried]))
            if on_tile is not None:
                on_tile(1, 1)
            return x0
        x, lr_latent, estimate, memory = pad_to_patch(x, lr_latent, estimate, memory)
        padded_height, padded_width = x.shape[-2:]
        tiles = grid_for(height, width)
        blender = None
        for done, (rows, cols) in enumerate(tiles, start=1):
            crop = (..., rows.slice, cols.slice)
            extra = [] if carried is None else [replace(carried, memory=None if memory is None else memory[crop])]
            x0 = denoise(x[crop], sigma, lr_latent[crop], estimate[crop], *extra)
            if tuple(x0.shape[-2:]) != (rows.length, cols.length):
                raise ValueError(f"denoise returned {tuple(x0.shape[-2:])} for a {rows.length}x{cols.length} "
                                 "latent tile; it must keep the spatial size")
            if blender is None:
                shape = (*x0.shape[:-2], padded_height, padded_width)
                blender = FeatherBlender(shape, height_dim=-2, width_dim=-1, dtype=x0.dtype, device=x0.device)
            blender.add(x0, rows, cols)
            if on_tile is not None:
                on_tile(done, len(tiles))
        blended = blender.result()
        return blended if (padded_height, padded_width) == (height, width) else blended[..., :height, :width]

    def grid_for(height, width):
        """The tiles a `height x width` latent is cut into (of the latent padded to whole patches)."""
        tiles = dit_tile_grid(height, width, tile, overlap, multiple)
        if len(tiles) == 1:
            return tiles
        return dit_tile_grid(round_up(height, PATCH), round_up(width, PATCH), tile, overlap, multiple)

    tiled.grid = grid_for  # for tests: the tiles a latent of that size is split into
    return tiled
