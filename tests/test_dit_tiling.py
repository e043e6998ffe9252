"""Spatial DiT tiling: exact for local models, shared noise, aligned plans, small seams on the real (tiny) Wan DiT."""
import pytest
import torch

from comfyui_litevsr.nodes.backbone import attach_adapter, backbone_signature, make_denoiser
from comfyui_litevsr.nodes.core.adapter import AdapterConfig, StateAwareAdapter
from comfyui_litevsr.nodes.core.backbones import WAN21_1_3B, WAN21_14B, WAN22_5B
from comfyui_litevsr.nodes.core.dit_tiling import (aligned_spans, default_overlap, dit_tile_grid, latent_tiling,
                                                   pad_to_patch, patch_multiple, tiled_denoiser, training_tile)
from comfyui_litevsr.nodes.core.geometry import BackboneSignature
from comfyui_litevsr.nodes.core.sampling import flow_sigmas, sample_vsr, seeded_noise

from tools import tiny_models


def local_denoise(x, sigma, lr_latent, estimate):
    """Spatially local: x0 at (h, w) reads x, lr and estimate only at (h, w) (channels and frames mix freely).

    Only element-wise ops, copies and power-of-two scalings (floor(4x)/4 is exact), each correctly rounded per
    element, so a tile's values cannot depend on which crop they were computed in."""
    return (x * 4).floor() * 0.25 + lr_latent.roll(1, dims=1) - estimate.flip(2) * 0.5 + sigma


class Recorder:
    def __init__(self, denoise):
        self.denoise, self.calls = denoise, []

    def __call__(self, x, sigma, lr_latent, estimate):
        self.calls.append((x.clone(), sigma, lr_latent.clone(), estimate.clone()))
        return self.denoise(x, sigma, lr_latent, estimate)


def video(height, width, seed=1, channels=4, frames=3):
    return torch.randn(2, channels, frames, height, width, generator=torch.Generator().manual_seed(seed))


# (height, width, tile, overlap): odd sizes, square and (h, w) tiles, no overlap, overlap over half the tile
EXACT_CASES = [(23, 37, 8, 2), (23, 37, 8, 0), (17, 30, (6, 10), (2, 4)), (31, 9, 12, 6), (9, 41, 4, 2),
               (24, 40, (8, 12), (4, 0))]


@pytest.mark.parametrize("height, width, tile, overlap", EXACT_CASES)
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("start", ["noise", "lr_latent"])
def test_local_model_is_reproduced_exactly(height, width, tile, overlap, steps, start):
    lr = video(height, width)
    noise = seeded_noise(lr.shape, 7)
    sigmas = flow_sigmas(steps, 5.0, 1.0 if start == "noise" else 0.6)
    recorder = Recorder(local_denoise)
    tiled = sample_vsr(tiled_denoiser(recorder, tile, overlap), lr, noise, sigmas, start)
    whole = sample_vsr(local_denoise, lr, noise, sigmas, start)
    assert len(recorder.calls) == steps * len(dit_tile_grid(height, width, tile, overlap)) > steps  # really tiled
    assert torch.equal(tiled, whole)


@pytest.mark.parametrize("height, width", [(22, 34), (21, 33)])
def test_every_tile_sees_the_full_noise_field(height, width):
    """The sampler draws the noise full-size; each tile call gets exactly its crop of that one field (so two
    overlapping tiles see identical noise where they overlap), and later steps get crops of the blended state.
    An odd latent is padded to whole patches first, as the untiled DiT (circular) and adapter (replicate) pad it."""
    tile, overlap = 10, 4
    lr = video(height, width)
    noise = seeded_noise(lr.shape, 3)
    sigmas = flow_sigmas(2, 5.0)
    recorder, whole_recorder = Recorder(local_denoise), Recorder(local_denoise)
    denoise = tiled_denoiser(recorder, tile, overlap)
    tiles = denoise.grid(height, width)
    sample_vsr(denoise, lr, noise, sigmas)
    sample_vsr(whole_recorder, lr, noise, sigmas)
    assert len(tiles) > 4 and len(recorder.calls) == 2 * len(tiles)
    assert tiles[-1][0].stop == height + height % 2 and tiles[-1][1].stop == width + width % 2
    padded_noise = pad_to_patch(noise, lr, lr)[0]
    for step, whole_call in enumerate(whole_recorder.calls):
        whole_x, whole_lr, whole_estimate = pad_to_patch(whole_call[0], whole_call[2], whole_call[3])
        for (rows, cols), (x, sigma, lr_tile, estimate) in zip(tiles, recorder.calls[step * len(tiles):]):
            crop = (..., rows.slice, cols.slice)
            if step == 0:
                assert torch.equal(x, padded_noise[crop])  # the first step's state is the noise itself
            assert torch.equal(x, whole_x[crop]) and sigma == whole_call[1]
            assert torch.equal(lr_tile, whole_lr[crop]) and torch.equal(estimate, whole_estimate[crop])
    # overlapping neighbours really share noise (not just each equal to "a" crop)
    (_, first_cols), (_, second_cols) = tiles[0], tiles[1]
    shared = slice(second_cols.start, first_cols.stop)
    assert shared.stop - shared.start >= overlap
    first_x, second_x = recorder.calls[0][0], recorder.calls[1][0]
    assert torch.equal(first_x[..., shared.start - first_cols.start:],
                       second_x[..., :shared.stop - second_cols.start])
    assert torch.equal(first_x[..., shared.start - first_cols.start:], noise[..., :tile, shared])


@pytest.mark.parametrize("height, width", [(22, 34), (21, 33), (12, 12)])
def test_carried_memory_is_cropped_like_the_lr_latent(height, width):
    """The adapter's memory (on the latent grid, its own frame count) reaches each tile as its crop of the memory
    padded like the LR latent; the per-frame noise levels reach every tile unchanged; (12, 12) is one tile."""
    from comfyui_litevsr.nodes.core.sampling import Carried

    lr = video(height, width)
    memory = video(height, width, seed=5, frames=2)
    carried = Carried(torch.tensor([0.5, 0.0, 0.5]), memory)
    calls = []

    def denoise(x, sigma, lr_latent, estimate, carried):
        calls.append((lr_latent, carried))
        return local_denoise(x, sigma, lr_latent, estimate)

    tiled = tiled_denoiser(denoise, 12, 4)
    tiled(lr, 0.5, lr, lr, carried)
    assert len(calls) == len(tiled.grid(height, width)) and (len(calls) == 1) == (height == 12)
    _, padded_lr, padded_memory = pad_to_patch(lr, lr, memory)
    for (rows, cols), (lr_tile, tile_carried) in zip(tiled.grid(height, width), calls):
        crop = (..., rows.slice, cols.slice)
        assert torch.equal(lr_tile, padded_lr[crop]) and torch.equal(tile_carried.memory, padded_memory[crop])
        assert tile_carried.frame_sigmas is carried.frame_sigmas
    with pytest.raises(ValueError, match="carried memory"):
        tiled(lr, 0.5, lr, lr, Carried(memory=memory[..., :-2]))


def test_odd_border_is_padded_as_the_dit_pads_it():
    x = torch.arange(15.0).reshape(1, 1, 1, 3, 5)
    padded_x, padded_lr, _ = pad_to_patch(x, -x, x)
    assert padded_x.shape[-2:] == (4, 6) and torch.equal(padded_x[..., :3, :5], x)
    assert torch.equal(padded_x[..., 3, :5], x[..., 0, :]) and torch.equal(padded_x[..., :3, 5], x[..., 0])  # wraps
    assert torch.equal(padded_lr[..., 3, :5], -x[..., 2, :]) and torch.equal(padded_lr[..., :3, 5], -x[..., 4])
    assert all(a is b for a, b in zip(pad_to_patch(padded_x, padded_x, padded_x), [padded_x] * 3))


def test_single_tile_is_a_plain_call():
    lr = video(12, 20)
    result = torch.zeros(1)
    calls = []

    def denoise(x, sigma, lr_latent, estimate):
        calls.append(x)
        return result

    progress = []
    assert tiled_denoiser(denoise, (12, 20), on_tile=lambda *a: progress.append(a))(lr, 0.5, lr, lr) is result
    assert len(calls) == 1 and calls[0] is lr and progress == [(1, 1)]


def test_progress_and_dtype():
    lr = video(20, 30).half()
    progress = []
    out = tiled_denoiser(local_denoise, 10, 2, on_tile=lambda *a: progress.append(a))(lr, 0.5, lr, lr)
    total = len(dit_tile_grid(20, 30, 10, 2))
    assert progress == [(done, total) for done in range(1, total + 1)] and total > 1
    assert out.dtype == torch.float16 and out.shape == lr.shape


# --- (d) plans are aligned to the patch and cover everything ---------------------------------------------------
@pytest.mark.parametrize("size", [1, 2, 7, 8, 9, 33, 60, 61, 104, 135, 257])
@pytest.mark.parametrize("tile, overlap, multiple", [(8, 2, 2), (8, 0, 2), (12, 10, 2), (60, 8, 2), (16, 4, 4),
                                                     (16, 0, 16), (2, 0, 2)])
def test_spans_are_aligned_and_cover(size, tile, overlap, multiple):
    spans = aligned_spans(size, tile, overlap, multiple)
    assert spans[0].start == 0 and spans[-1].stop == size
    assert spans[0].ramp_before == 0 and spans[-1].ramp_after == 0
    for span in spans:
        assert span.start % multiple == 0  # a token never straddles a tile edge
        assert span.length == min(tile, size - span.start) and span.length % multiple in (0, size % multiple)
        assert span.length % multiple == 0 or span.stop == size  # only a tile at an odd border is cut short
    for previous, current in zip(spans, spans[1:]):
        assert previous.start < current.start and previous.stop <= current.stop
        assert previous.stop - current.start >= overlap
        assert previous.ramp_after == current.ramp_before == previous.stop - current.start
    covered = torch.zeros(size, dtype=torch.int)
    for span in spans:
        covered[span.slice] += 1
    assert (covered > 0).all()
    if size <= tile:
        assert len(spans) == 1


def test_grid_covers_the_latent():
    tiles = dit_tile_grid(45, 77, (12, 20), None, 2)
    covered = torch.zeros(45, 77, dtype=torch.int)
    for rows, cols in tiles:
        assert rows.start % 2 == 0 and cols.start % 2 == 0 and (rows.length, cols.length) <= (12, 20)
        covered[rows.slice, cols.slice] += 1
    assert (covered > 0).all()
    assert len({(rows.start, cols.start) for rows, cols in tiles}) == len(tiles)


# --- defaults for the real backbones -----------------------------------------------------------------------------
def test_training_tiles_of_the_published_backbones():
    assert training_tile(WAN21_1_3B) == (60, 104)  # 832x480 px at stride 8
    assert training_tile(WAN21_14B) == (90, 160)  # 1280x720 px at stride 8
    assert training_tile(WAN22_5B) == (44, 80)  # 1280x704 px at stride 16
    assert training_tile(WAN21_1_3B, height=270, width=480) == (60, 104)
    assert training_tile(WAN21_1_3B, height=480, width=270) == (104, 60)  # portrait video, portrait tile
    assert all(patch_multiple(sig) == 2 for sig in (WAN21_1_3B, WAN21_14B, WAN22_5B))


def test_default_overlap_is_an_eighth_on_the_patch_grid():
    assert default_overlap((60, 104)) == (8, 14)
    assert default_overlap((90, 160)) == (12, 20)
    assert default_overlap((44, 80)) == (6, 10)
    assert default_overlap(4) == (2, 2)  # never less than one patch
    for tile in ((60, 104), (90, 160), (44, 80)):
        dit_tile_grid(500, 500, tile)  # the defaults make valid plans


def test_pixel_settings_to_latent():
    assert latent_tiling(WAN21_1_3B, (480, 832), (64, 112)) == ((60, 104), (8, 14))
    assert latent_tiling(WAN21_1_3B, 512) == ((64, 64), (8, 8))
    assert latent_tiling(WAN22_5B, (704, 1280), 64) == ((44, 80), (4, 4))
    assert latent_tiling(WAN22_5B, (704, 1280)) == ((44, 80), (6, 10))


# --- (e) bad settings are refused with the fix named -------------------------------------------------------------
@pytest.mark.parametrize("tile, overlap, multiple, message", [
    (7, 2, 2, r"tile height 7 .* multiple of the patch size 2.*use 6 or 8"),
    ((8, 9), 2, 2, r"tile width 9 .*use 8 or 10"),
    (0, 0, 2, r"positive multiple"),
    (8, 3, 2, r"overlap 3 .* multiple of the patch size 2; use 2 or 4"),
    (8, -2, 2, r"overlap -2 .* must be 0 or a multiple"),
    (8, 8, 2, r"overlap 8 must be smaller than the tile"),
    (8, (2, 10), 2, r"overlap 10 must be smaller than the tile width 8"),
    (8, 2, 0, r"multiple must be a positive int"),
    (6, 0, 3, r"multiple 3 must be a multiple of the Wan DiT patch \(2\).*use 4"),
    (8.0, 2, 2, r"whole numbers"),
    ((8, 8, 8), 2, 2, r"\(height, width\) pair"),
])
def test_bad_tiling_is_refused(tile, overlap, multiple, message):
    with pytest.raises(ValueError, match=message):
        tiled_denoiser(local_denoise, tile, overlap, multiple)


@pytest.mark.parametrize("tile_px, overlap_px, message", [
    (500, 64, r"tile size 500 px is not a multiple of the wan2.1 DiT grid \(16 px = VAE stride 8 x patch 2\); "
              r"use 496 or 512 px"),
    (512, 60, r"overlap 60 px .*use 48 or 64 px"),
    (512, 512, r"overlap \(512 px\) must be smaller than the tile \(512 px\)"),
    (0, 0, r"must be positive"),
    (512, -16, r"0 or more"),
])
def test_bad_pixel_tiling_is_refused(tile_px, overlap_px, message):
    with pytest.raises(ValueError, match=message):
        latent_tiling(WAN21_1_3B, tile_px, overlap_px)


def test_wan22_grid_is_32px():
    with pytest.raises(ValueError, match=r"wan2.2 DiT grid \(32 px = VAE stride 16 x patch 2\); use 672 or 704 px"):
        latent_tiling(WAN22_5B, 704 - 16)


def test_mismatched_latents_and_unknown_backbones_are_refused():
    x = video(16, 16)
    denoise = tiled_denoiser(local_denoise, 8, 2)
    with pytest.raises(ValueError, match="lr_latent .* does not match x"):
        denoise(x, 0.5, video(16, 18), x)
    with pytest.raises(ValueError, match="estimate .* does not match x"):
        denoise(x, 0.5, x, x[:, :, :2])
    with pytest.raises(ValueError, match=r"expected latents \[B, C, T, h, w\]"):
        denoise(x[0], 0.5, x[0], x[0])
    with pytest.raises(ValueError, match="must keep the spatial size"):
        tiled_denoiser(lambda x, *rest: x[..., :-1], 8, 2)(x, 0.5, x, x)
    with pytest.raises(ValueError, match="pass the DiT tile size explicitly"):
        training_tile(BackboneSignature("hunyuan", 256, 2, 2, 16, 8))


# --- (c) the real tiny Wan DiT through ComfyUI ---------------------------------------------------------------------
# Wan's self-attention is global, so a tile's tokens lose the context outside the tile and tiled output differs
# from the whole. The tiny stand-in (tools/tiny_models.py, weights ~N(0, 0.02)) attends almost uniformly, so a
# tile shifts every token's attention context a little and the difference is spread evenly, not piled up at tile
# edges. Measured on a 32x48 latent with 16-latent tiles, 1 step from noise (errors relative to the untiled
# output's std): hard tiles (no overlap) max 0.0035, mean 0.00057; feathered (overlap 4) max 0.0034, mean 0.00054;
# the error jump across the hard tile edges (mean 0.00080) equals the jump between any two neighbours (0.00081):
# no seam line. Tolerances: max 0.02 and mean 0.003 (about 5x the measurement, far below anything visible yet far
# above float noise ~1e-7), feathered no worse than hard, and the jump across hard edges under 1.5x the jump
# elsewhere (a seam would show as jumps concentrated on the tile edges).
MAX_REL, MEAN_REL, SEAM_JUMP_RATIO = 0.02, 0.003, 1.5


@pytest.fixture(scope="module")
def real_denoiser(tiny_dit):
    adapter = StateAwareAdapter(AdapterConfig(backbone_signature(tiny_dit)))  # zero-initialised injections
    return make_denoiser(attach_adapter(tiny_dit, adapter, tiny_models.zero_text_context()))


def _sample(denoise, lr, noise, steps):
    with torch.no_grad():
        return sample_vsr(denoise, lr, noise, flow_sigmas(steps, 5.0)).float()


def test_real_dit_seams_stay_small(real_denoiser, tiny_dit):
    height, width = 32, 48
    lr = video(height, width, channels=16, frames=2)[:1]
    noise = seeded_noise(lr.shape, 0)
    for steps in (1, 2):
        whole = _sample(real_denoiser, lr, noise, steps)
        std = whole.std()
        errors = {}
        for name, overlap in (("hard", 0), ("feathered", 4)):
            calls = []
            tiled = _sample(tiled_denoiser(real_denoiser, 16, overlap, on_tile=lambda *a: calls.append(a)),
                            lr, noise, steps)
            assert len(calls) == steps * len(dit_tile_grid(height, width, 16, overlap)) >= 6 * steps
            errors[name] = error = (tiled - whole) / std
            print(f"\n[dit tiling] {steps} step(s), {name} tiles 16 overlap {overlap}: max |diff|/std "
                  f"{error.abs().max():.4f}, mean {error.abs().mean():.5f}")
            assert error.abs().max() < MAX_REL and error.abs().mean() < MEAN_REL
        assert errors["feathered"].abs().mean() <= errors["hard"].abs().mean()
        # hard tiles meet at rows 16 and columns 16, 32: compare the error's jump there with the jump elsewhere
        error = errors["hard"]
        across_w, across_h = (error[..., 1:] - error[..., :-1]).abs(), (error[..., 1:, :] - error[..., :-1, :]).abs()
        edge_w, edge_h = torch.zeros(width - 1, dtype=torch.bool), torch.zeros(height - 1, dtype=torch.bool)
        edge_w[[15, 31]], edge_h[15] = True, True
        at_edges = torch.cat([across_w[..., edge_w].flatten(), across_h[..., edge_h, :].flatten()]).mean()
        elsewhere = torch.cat([across_w[..., ~edge_w].flatten(), across_h[..., ~edge_h, :].flatten()]).mean()
        print(f"[dit tiling] error jump across hard tile edges {at_edges:.5f} vs elsewhere {elsewhere:.5f}")
        assert at_edges < SEAM_JUMP_RATIO * elsewhere


def test_real_dit_odd_size_and_training_tile(real_denoiser, tiny_dit):
    """An odd latent tiles through the real wrapper (the DiT and the adapter pad the border tile as they pad the
    whole); a latent within the training tile is one plain call, bit for bit the untiled result."""
    lr = video(21, 35, channels=16, frames=2)[:1]
    noise = seeded_noise(lr.shape, 1)
    whole = _sample(real_denoiser, lr, noise, 1)
    tiled = _sample(tiled_denoiser(real_denoiser, 12, 4), lr, noise, 1)
    error = (tiled - whole) / whole.std()
    print(f"\n[dit tiling] 21x35 latent, tiles 12 overlap 4: max |diff|/std {error.abs().max():.4f}, "
          f"mean {error.abs().mean():.5f}")
    assert tiled.shape == whole.shape and error.abs().max() < MAX_REL and error.abs().mean() < MEAN_REL
    signature = backbone_signature(tiny_dit)
    default = _sample(tiled_denoiser(real_denoiser, training_tile(signature), multiple=patch_multiple(signature)),
                      lr, noise, 1)
    assert torch.equal(default, whole)
