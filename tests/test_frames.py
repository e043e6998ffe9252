"""The frame/size contract: whatever goes in comes out at exactly N x scale*H x scale*W."""
import pytest
import torch

from comfyui_litevsr.nodes.core.frames import crop_to, pad_for_encode, resize_frames
from comfyui_litevsr.nodes.core.geometry import TEMPORAL_STRIDE, WAN_PATCH
from comfyui_litevsr.nodes.decode_nodes import LiteVSRTiledDecode
from comfyui_litevsr.nodes.video_nodes import LiteVSREncodeVideo

QCIF = (144, 176)  # height, width
ODD = (29, 37)


def _clip(count, height, width):
    return torch.rand(count, height, width, 3, generator=torch.Generator().manual_seed(count))


@pytest.mark.parametrize("count", [1, 2, 7, 33])
@pytest.mark.parametrize("size", [QCIF, ODD])
@pytest.mark.parametrize("scale, grid_px", [(4, 16), (3, 32)])
def test_resize_pad_crop_round_trip(count, size, scale, grid_px):
    height, width = size
    upscaled = resize_frames(_clip(count, height, width), scale * height, scale * width)
    padded = pad_for_encode(upscaled, grid_px)

    padded_count, padded_height, padded_width = padded.shape[:3]
    assert (padded_count - 1) % TEMPORAL_STRIDE == 0 and padded_count - count < TEMPORAL_STRIDE
    assert padded_height % grid_px == 0 and padded_height - scale * height < grid_px
    assert padded_width % grid_px == 0 and padded_width - scale * width < grid_px
    # replicate padding: the border repeats the last row/column/frame
    assert torch.equal(padded[:count, padded_height - 1, :scale * width], upscaled[:, -1])
    assert torch.equal(padded[:count, :scale * height, padded_width - 1], upscaled[:, :, -1])
    assert torch.equal(padded[-1, :scale * height, :scale * width], upscaled[-1])
    assert torch.equal(crop_to(padded, count, scale * height, scale * width), upscaled)


def test_resize_is_clamped_and_antialiased():
    stripes = torch.zeros(1, 64, 64, 3)
    stripes[:, :, ::2] = 1.0  # finest possible pattern: a 4x downscale must average it, not alias it
    interior = resize_frames(stripes, 16, 16)[:, 2:-2, 2:-2]  # the outer pixels see the border, not stripes
    assert torch.allclose(interior, torch.full_like(interior, 0.5), atol=0.02)
    sharp_edge = torch.zeros(1, 8, 8, 3)
    sharp_edge[:, :, 4:] = 1.0
    assert resize_frames(sharp_edge, 32, 32).aminmax() == (0.0, 1.0)  # bicubic overshoot is clamped


def test_crop_refuses_a_too_small_video():
    with pytest.raises(ValueError, match="smaller than the size recorded"):
        crop_to(torch.zeros(5, 16, 16, 3), 9, 16, 16)


# Sizes kept small for the CPU: the odd size exercises spatial padding, QCIF at scale 1 a multi-tile decode.
@pytest.mark.parametrize("count, size, scale", [(1, ODD, 2), (2, ODD, 2), (7, ODD, 2), (33, ODD, 2), (7, QCIF, 1)])
def test_encode_and_tiled_decode_give_the_exact_clip(tiny_vae, count, size, scale):
    height, width = size
    latent = LiteVSREncodeVideo.execute(tiny_vae, _clip(count, height, width), scale).result[0]

    grid_px = tiny_vae.spacial_compression_encode() * WAN_PATCH[1]
    samples = latent["samples"]
    assert samples.shape[2] == (count - 1 + TEMPORAL_STRIDE - 1) // TEMPORAL_STRIDE + 1
    assert samples.shape[3] * 8 % grid_px == 0 and samples.shape[4] * 8 % grid_px == 0
    assert latent["litevsr"] == {"frames": count, "height": scale * height, "width": scale * width}

    frames = LiteVSRTiledDecode.execute(tiny_vae, latent, tile_size=96, overlap=32).result[0]
    assert frames.shape == (count, scale * height, scale * width, 3)
    assert frames.dtype == torch.float32 and frames.device.type == "cpu"


@pytest.mark.matrix("Video", "zero frames")
def test_encode_rejects_an_empty_clip(tiny_vae):
    with pytest.raises(ValueError, match="no frames"):
        LiteVSREncodeVideo.execute(tiny_vae, torch.zeros(0, 16, 16, 3), 2)


def test_decode_rejects_a_latent_without_litevsr_metadata(tiny_vae):
    with pytest.raises(ValueError, match="Encode LR Video"):
        LiteVSRTiledDecode.execute(tiny_vae, {"samples": torch.zeros(1, 16, 1, 4, 4)}, tile_size=512, overlap=64)
