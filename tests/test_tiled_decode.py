"""Tiled decode: one temporal pass per tile (no temporal seams) and feathered spatial seams."""
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from comfyui_litevsr.nodes.core.decode import tile_count, tiled_decode
from comfyui_litevsr.nodes.core.tiling import tile_grid

STRIDE = 8


def nearest_decoder(latent):
    """Spatially local stand-in for a VAE: every pixel copies the latent under it (copies are exact, so any
    difference from the untiled result can only come from the tiling)."""
    rgb = rearrange(latent[0, :3], "c t h w -> t c h w")
    return rearrange(F.interpolate(rgb, scale_factor=STRIDE, mode="nearest"), "t c h w -> t h w c")


class ConvDecoder:
    """A decoder with a known receptive field: `layers` zero-padded 3x3 convs (radius `layers` latents).

    Zero padding is what makes tile borders wrong in a real VAE too; beyond the receptive field a tile is exact.
    """

    def __init__(self, layers=2, channels=16, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.weights = [torch.randn(channels, channels, 3, 3, generator=generator) / (3 * channels ** 0.5)
                        for _ in range(layers)]

    def __call__(self, latent):
        hidden = rearrange(latent[0], "c t h w -> t c h w")
        for weight in self.weights:
            hidden = torch.tanh(F.conv2d(hidden, weight, padding=1)) + hidden
        pixels = F.interpolate(torch.sigmoid(hidden[:, :3]), scale_factor=STRIDE, mode="bilinear")
        return rearrange(pixels, "t c h w -> t h w c")


def _latent(frames, height, width, seed=0):
    return torch.randn(1, 16, frames, height, width, generator=torch.Generator().manual_seed(seed))


def test_spatially_local_decoder_is_reproduced_exactly():
    latent = _latent(3, 21, 19)
    calls = []
    tiled = tiled_decode(latent, nearest_decoder, STRIDE, tile_px=64, overlap_px=24,
                         on_tile=lambda done, total: calls.append((done, total)))
    total = tile_count(21, 19, STRIDE, 64, 24)
    assert total >= 9 and calls == [(done, total) for done in range(1, total + 1)]
    assert torch.equal(tiled, nearest_decoder(latent))  # exact, not just to rounding


def test_a_latent_that_fits_one_tile_is_one_plain_decode():
    latent = _latent(2, 8, 8)
    calls = []
    result = tiled_decode(latent, lambda z: calls.append(z.shape) or nearest_decoder(z), STRIDE, 64, 16)
    assert calls == [latent.shape]
    assert torch.equal(result, nearest_decoder(latent))


def test_tile_count_equals_the_grid_tiled_decode_walks():
    """The progress bar's count is computed without building the grid; it must still be the grid's length."""
    for height in range(1, 40, 3):
        for width in range(1, 60, 7):
            for tile_px, overlap_px in ((32, 8), (64, 24), (128, 64), (16, 0)):
                tile, overlap = tile_px // STRIDE, overlap_px // STRIDE
                assert tile_count(height, width, STRIDE, tile_px, overlap_px) == \
                    len(tile_grid(height, width, tile, overlap)), (height, width, tile_px, overlap_px)


@pytest.mark.parametrize("tile_px, overlap_px, fix", [(60, 16, "multiples"), (64, 12, "multiples"),
                                                      (64, 64, "larger than the overlap"), (64, -8, ">= 0")])
def test_bad_tile_settings_are_refused_with_the_fix(tile_px, overlap_px, fix):
    with pytest.raises(ValueError, match=fix):
        tiled_decode(_latent(1, 16, 16), nearest_decoder, STRIDE, tile_px, overlap_px)


def test_spatial_seams_stay_within_tolerance():
    # Tolerance 2e-2 on the 0..1 scale. A tile's pixels are wrong only within the decoder's receptive field of a
    # tile border (here 2 latents = 16 px); the cosine ramp spans the whole overlap and starts near 0 at the
    # border, so with the node's default overlap (64 px = 8 latents) those pixels carry little weight.
    # Measured: 1.4e-2 with 64 px overlap, 0.54 with none (a hard seam).
    decoder = ConvDecoder(layers=2)
    latent = _latent(3, 32, 32)
    reference = decoder(latent)
    feathered = tiled_decode(latent, decoder, STRIDE, tile_px=128, overlap_px=64)
    assert tile_count(32, 32, STRIDE, 128, 64) == 9
    seam_error = (feathered - reference).abs().max().item()
    hard_seam_error = (tiled_decode(latent, decoder, STRIDE, tile_px=128, overlap_px=0) - reference).abs().max().item()
    print(f"seam max abs diff: feathered {seam_error:.2e}, no overlap {hard_seam_error:.2e}")
    assert seam_error <= 2e-2
    assert hard_seam_error > 5 * seam_error


@pytest.fixture(scope="module")
def vae_latent(tiny_vae):
    frames = torch.rand(13, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    return tiny_vae.encode(frames)  # [1, 16, 4, 8, 8]


def _vae_decoder(vae):
    return lambda latent: vae.decode(latent)[0]


def test_tiles_are_decoded_in_one_causal_pass(tiny_vae, vae_latent):
    # A causal VAE decoded in one pass gives the first 4m-3 frames from the first m latent frames alone, whatever
    # follows; a decode that restarted the temporal cache anywhere would break this. 3x3 spatial tiles here.
    decode = _vae_decoder(tiny_vae)
    assert tile_count(8, 8, STRIDE, 32, 16) == 9
    whole = tiled_decode(vae_latent, decode, STRIDE, tile_px=32, overlap_px=16)
    assert whole.shape[0] == 13
    for latent_frames in (1, 2, 3):
        prefix = tiled_decode(vae_latent[:, :, :latent_frames], decode, STRIDE, tile_px=32, overlap_px=16)
        torch.testing.assert_close(whole[:prefix.shape[0]], prefix, atol=1e-5, rtol=0)


def test_comfyui_temporal_tiling_leaves_a_temporal_seam_ours_does_not(tiny_vae, vae_latent):
    # ComfyUI's VAEDecodeTiled tiles time too (temporal_size 64 frames by default): tile_t=2 latent frames here
    # stands in for a long clip. Its second temporal tile restarts the causal cache and drifts from the one-pass
    # decode from there on; ours keeps every frame of the one-pass decode.
    decode = _vae_decoder(tiny_vae)
    one_pass = decode(vae_latent)
    with torch.inference_mode():  # as ComfyUI runs its VAEDecodeTiled node (0.33 updates inference tensors in place)
        comfy_tiled = tiny_vae.decode_tiled(vae_latent, tile_x=64, tile_y=64, overlap=1, tile_t=2, overlap_t=1)[0]
    ours = tiled_decode(vae_latent, decode, STRIDE, tile_px=64, overlap_px=16)

    comfy_error = (comfy_tiled - one_pass).abs().amax(dim=(1, 2, 3))
    ours_error = (ours - one_pass).abs().amax(dim=(1, 2, 3))
    first_chunk = 4  # frames that only the first latent frame and the first chunk decode
    assert comfy_error[:first_chunk].max() < 1e-5 and comfy_error[first_chunk:].max() > 0.1
    assert ours_error.max() < 1e-5


def test_tiny_wan_vae_spatial_seams_stay_within_tolerance(tiny_vae):
    # The real (tiny) Wan2.1 VAE, 512x512 output in 2x2 tiles of 384 px: overlap 32 latents (256 px).
    # Tolerance 2e-2 on the 0..1 scale. Two things make a tile differ from the whole frame: zero padding at tile
    # borders inside the decoder's receptive field, and the mid-block attention, which sees only its tile. The
    # feather ramp gives border pixels almost no weight; the attention part shrinks as tiles grow (measured on
    # this stand-in: 2.9e-2 with 256-px tiles, 1.2e-2 with 384-px tiles), which is why the node's default tile
    # is 512 px. A hard seam (no overlap) is far worse.
    latent = torch.randn(1, 16, 2, 64, 64, generator=torch.Generator().manual_seed(0))
    decode = _vae_decoder(tiny_vae)
    with torch.no_grad():
        reference = decode(latent)
        feathered = tiled_decode(latent, decode, STRIDE, tile_px=384, overlap_px=128)
        hard = tiled_decode(latent, decode, STRIDE, tile_px=256, overlap_px=0)
    assert tile_count(64, 64, STRIDE, 384, 128) == 4
    seam_error = (feathered - reference).abs().max().item()
    hard_error = (hard - reference).abs().max().item()
    print(f"tiny Wan VAE seam max abs diff: feathered {seam_error:.2e}, hard seams {hard_error:.2e}")
    assert feathered.shape == reference.shape
    assert seam_error <= 2e-2
    assert hard_error > 3 * seam_error
