"""Tile plans cover their range with the requested overlap, and feathered blending is exact on constants."""
import pytest
import torch

from comfyui_litevsr.nodes.core.tiling import FeatherBlender, feather_ramp, tile_grid, tile_spans, tile_starts

PLANS = [(size, tile, overlap) for size in (1, 7, 8, 9, 64, 100, 257) for tile, overlap in ((8, 0), (8, 2), (8, 7), (32, 8))]


@pytest.mark.parametrize("size, tile, overlap", PLANS)
def test_plan_covers_the_range_with_enough_overlap(size, tile, overlap):
    spans = tile_spans(size, tile, overlap)
    assert spans[0].start == 0 and spans[-1].stop == size
    assert all(span.length == min(tile, size) for span in spans)
    for previous, current in zip(spans, spans[1:]):
        assert previous.start < current.start
        assert previous.stop - current.start >= overlap  # shared part, so no gaps either
        assert previous.ramp_after == current.ramp_before == previous.stop - current.start
    assert spans[0].ramp_before == 0 and spans[-1].ramp_after == 0  # no fade on the image border


def test_single_tile_when_the_range_fits():
    assert tile_starts(8, 8, 4) == [0]
    assert tile_starts(5, 8, 4) == [0]
    assert len(tile_starts(9, 8, 4)) == 2


@pytest.mark.parametrize("tile, overlap", [(8, 8), (8, 9), (0, 0), (8, -1)])
def test_impossible_plans_are_refused(tile, overlap):
    with pytest.raises(ValueError, match="overlap < tile"):
        tile_starts(100, tile, overlap)


@pytest.mark.parametrize("length, before, after", [(16, 0, 0), (16, 4, 0), (16, 0, 5), (16, 4, 6), (10, 5, 5)])
def test_ramp_is_positive_and_one_in_the_interior(length, before, after):
    weights = feather_ramp(length, before, after)
    assert (weights > 0).all() and (weights <= 1).all()
    interior = weights[before:length - after]
    assert torch.equal(interior, torch.ones_like(interior))
    if before:
        assert (weights[:before].diff() > 0).all() and weights[before - 1] < 1
    if after:
        assert (weights[length - after:].diff() < 0).all() and weights[length - after] < 1


def test_ramps_longer_than_half_the_tile_stay_positive():
    # overlap > tile/2: both ramps cover the middle, weights multiply instead of overwriting
    weights = feather_ramp(10, 7, 7)
    assert (weights > 0).all() and (weights < 1).all()
    assert torch.allclose(weights, weights.flip(0))


def test_matching_ramps_sum_to_one():
    up, down = feather_ramp(12, 6, 0)[:6], feather_ramp(12, 0, 6)[6:]
    assert torch.allclose(up + down, torch.ones(6, dtype=up.dtype))


@pytest.mark.parametrize("height, width, tile, overlap", [(40, 57, 16, 4), (33, 33, 8, 5), (10, 10, 16, 4)])
def test_blending_reproduces_the_input(height, width, tile, overlap):
    # [T, H, W, C] frames, tiled on dims 1 and 2, each tile cut from the same tensor: the blend gives it back
    # bit for bit (a running lerp of equal values is exact), in float32 as the decode uses it
    source = torch.rand(3, height, width, 2)
    blender = FeatherBlender(source.shape, height_dim=1, width_dim=2)
    for rows, cols in tile_grid(height, width, tile, overlap):
        blender.add(source[:, rows.slice, cols.slice], rows, cols)
    assert torch.equal(blender.result(), source)


def test_blending_weights_overlapping_tiles_by_their_feather():
    # Two tiles that disagree: inside the overlap the result is their feather-weighted mean.
    rows, cols = tile_spans(4, 4, 0)[0], tile_spans(10, 6, 2)
    blender = FeatherBlender((4, 10), height_dim=0, width_dim=1, dtype=torch.float64)
    blender.add(torch.zeros(4, 6, dtype=torch.float64), rows, cols[0])
    blender.add(torch.ones(4, 6, dtype=torch.float64), rows, cols[1])
    left = feather_ramp(cols[0].length, cols[0].ramp_before, cols[0].ramp_after, torch.float64)
    right = feather_ramp(cols[1].length, cols[1].ramp_before, cols[1].ramp_after, torch.float64)
    overlap = cols[0].stop - cols[1].start
    expected_overlap = right[:overlap] / (left[-overlap:] + right[:overlap])
    assert torch.allclose(blender.result()[0, cols[1].start:cols[0].stop], expected_overlap, atol=1e-12, rtol=0)
    assert torch.equal(blender.result()[:, :cols[1].start], torch.zeros(4, cols[1].start, dtype=torch.float64))


def test_blending_a_constant_is_exact_on_latent_layout():
    # [B, C, T, h, w] latents, as a DiT spatial tiler would use it
    constant = torch.full((1, 4, 2, 37, 29), 0.7)
    blender = FeatherBlender(constant.shape, height_dim=-2, width_dim=-1)
    plan = tile_grid(37, 29, 12, 4)
    assert len({rows for rows, _ in plan}) > 1 and len({cols for _, cols in plan}) > 1
    for rows, cols in plan:
        blender.add(constant[..., rows.slice, cols.slice], rows, cols)
    assert torch.equal(blender.result(), constant)
