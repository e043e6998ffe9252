"""Decoding with a tiny Wan decoder from the stock Load VAE (nodes/decoders.py): the latent reaches the decoder
unscaled even where ComfyUI's loader would scale it, frame counts and sizes equal the Wan VAE's, the VAE is
loaded once per tiled decode, a decoder of other latents is refused, and tiled equals untiled wherever the
decoder's receptive field fits inside one tile."""
import subprocess
import sys

import av
import pytest
import torch

import comfy.model_management
import comfy.sd
import folder_paths
import nodes as comfy_nodes
from comfyui_litevsr.nodes import decoders
from comfyui_litevsr.nodes.core.tiling import tile_spans
from conftest import REPO
from tools import demo as demo_tool
from tools import tiny_models


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """A models folder holding every tiny decoder stand-in where the stock Load VAE looks for it."""
    base = tmp_path_factory.mktemp("decoder_models")
    for name in tiny_models.TINY_DECODERS:
        tiny_models.save_tiny_decoder(base, name)
    for folder in ("vae", "vae_approx"):
        folder_paths.add_model_folder_path(folder, str(base / folder))
    return base


def load_vae(name):
    """What the stock Load VAE node returns for `name`."""
    return comfy_nodes.VAELoader().load_vae(name)[0]


def random_latent(channels, frames, height, width, seed=0):
    return torch.randn(1, channels, frames, height, width, generator=torch.Generator().manual_seed(seed))


def test_the_stock_loader_lists_and_loads_each_decoder_by_its_published_name(models_dir):
    listed = comfy_nodes.VAELoader.vae_list(comfy_nodes.VAELoader)
    for name, (_, channels, _) in tiny_models.TINY_DECODERS.items():
        assert name in listed
        vae = load_vae(name)
        assert decoders.is_tiny_decoder(vae) and vae.latent_channels == channels


def test_fp16_wan_tiny_decoder_gets_the_latent_unscaled(models_dir):
    """taew2_1 ships in fp16, which ComfyUI takes for HunyuanVideo's taehv: its decode would scale the Wan latent
    by HunyuanVideo's factor. What reaches the network must be the latent itself, and the frames must equal
    those of the same weights loaded without the scaling (an fp32 copy)."""
    vae = load_vae("taew2_1.safetensors")
    assert vae.first_stage_model.latent_format is not None  # the loader's pitfall is present in this ComfyUI
    reached = []
    first_layer = vae.first_stage_model.decoder[0]  # called per frame, in frame order (or once on all frames)
    hook = first_layer.register_forward_pre_hook(lambda _, args: reached.append(args[0].clone()))
    latent = random_latent(16, 2, 6, 8)
    try:
        with torch.inference_mode():
            frames = decoders.decode_tiled(vae, latent, 4096, 0)
            scaled = vae.decode(latent)[0]  # ComfyUI's own path, scaling included: the failure the fix prevents
    finally:
        hook.remove()
    ours = torch.cat([x.reshape(-1) for x in reached[:len(reached) // 2]])  # the first half: decode_tiled's calls
    torch.testing.assert_close(ours, latent.movedim(1, 2).reshape(-1), rtol=1e-6, atol=1e-6)
    weights = tiny_models.tiny_decoder_state_dict(16, torch.float16)
    unscaled = comfy.sd.VAE(sd={k: v.float() for k, v in weights.items()})
    assert unscaled.first_stage_model.latent_format is None
    with torch.inference_mode():
        reference = unscaled.decode(latent)[0]
    torch.testing.assert_close(frames, reference, rtol=1e-5, atol=1e-5)
    assert (scaled - reference).abs().max() > 100 * (frames - reference).abs().max()


@pytest.mark.parametrize("name", ["lighttaew2_1.safetensors", "lighttaew2_2.safetensors"])
def test_tiny_decoder_frames_and_size_equal_the_wan_vae(models_dir, name):
    """4n+1 frames from n+1 latent frames and the Wan VAE's spatial stride (8 for 16 channels, 16 for 48), as the
    pack's frame and size bookkeeping assumes; and the direct per-tile call equals ComfyUI's VAE.decode."""
    vae = load_vae(name)
    channels, stride = vae.latent_channels, {16: 8, 48: 16}[vae.latent_channels]
    assert vae.spacial_compression_decode() == stride
    for latent_frames in (1, 2, 3):
        latent = random_latent(channels, latent_frames, 3, 5, seed=latent_frames)
        with torch.inference_mode():
            frames = decoders.decode_tiled(vae, latent, 4096, 0)
            torch.testing.assert_close(frames, vae.decode(latent)[0].float(), rtol=0, atol=0)
        assert tuple(frames.shape) == (4 * latent_frames - 3, 3 * stride, 5 * stride, 3)


def test_a_tiled_decode_loads_the_vae_once_and_reports_every_tile(models_dir, monkeypatch):
    vae = load_vae("lighttaew2_1.safetensors")
    loads, tiles = [], []
    load = comfy.model_management.load_models_gpu
    monkeypatch.setattr(comfy.model_management, "load_models_gpu", lambda *a, **k: loads.append(1) or load(*a, **k))
    with torch.inference_mode():
        decoders.decode_tiled(vae, random_latent(16, 1, 8, 8), 48, 16, on_tile=lambda done, total: tiles.append(done))
    assert len(loads) == 1 and tiles == [1, 2, 3, 4]


def test_a_decoder_of_other_latents_is_refused_with_the_fix(models_dir):
    with pytest.raises(ValueError, match="taew2_1 / lighttaew2_1"):
        decoders.decode_tiled(load_vae("lighttaew2_2.safetensors"), random_latent(16, 1, 4, 4), 4096, 0)


def test_without_taehv_support_there_is_one_line_naming_the_fix(monkeypatch):
    assert decoders.tiny_decoder_support() is None
    monkeypatch.setitem(sys.modules, "comfy.taesd.taehv", None)  # as on a ComfyUI without comfy/taesd/taehv.py
    message = decoders.tiny_decoder_support()
    assert "\n" not in message and "update ComfyUI" in message


def receptive_radius(decoder):
    """How far (in latent px) an output pixel of a TAEHV decoder sees: every 3x3 conv adds one pixel at its
    resolution, every 2x upsample halves what a pixel is worth; 1x1 convs (TGrow, skips) add nothing."""
    radius, scale = 0.0, 1
    for module in decoder.modules():
        if isinstance(module, torch.nn.Upsample):
            scale *= int(module.scale_factor)
        elif isinstance(module, torch.nn.Conv2d) and module.kernel_size == (3, 3):
            radius += 1 / scale
    return int(-(-radius // 1))


def test_tiled_equals_untiled_outside_the_shared_bands(models_dir):
    """A tiny decoder is local (no attention): an output pixel depends only on latents within its receptive
    radius R. Where a pixel is covered by one tile only and lies >= R latent px inside it, the tile computes
    exactly the untiled value and the blender passes it through unchanged (weight 1): equal to float rounding.
    In the bands two tiles share, each tile's border (zero padding) is inside R, so there the blend differs:
    bounded, not equal."""
    vae = load_vae("lighttaew2_1.safetensors")
    radius = receptive_radius(vae.first_stage_model.decoder)
    assert 15 <= radius <= 20  # TAEHV: 10 convs at latent resolution, 10 at 2x, 10 at 4x, 2 at 8x
    stride, height, width, tile, overlap = 8, 4, 2 * radius + 44, 2 * radius + 20, 2 * radius - 4
    latent = random_latent(16, 2, height, width)
    with torch.inference_mode():
        untiled = decoders.decode_tiled(vae, latent, 4096, 0)
        tiled = decoders.decode_tiled(vae, latent, tile * stride, overlap * stride)
    spans = tile_spans(width, tile, overlap)
    assert len(spans) == 2
    shared = slice(spans[1].start * stride, spans[0].stop * stride)
    alone = torch.ones(width * stride, dtype=torch.bool)
    alone[shared] = False
    # every pixel outside the shared band is at least the band's width (>= R) from its only tile's inner border
    assert spans[0].stop - spans[1].start >= radius
    torch.testing.assert_close(tiled[:, :, alone], untiled[:, :, alone], rtol=1e-5, atol=1e-5)
    assert (tiled[:, :, shared] - untiled[:, :, shared]).abs().max() < 0.5


def test_the_headless_upscale_decodes_with_the_given_decoder(models_dir, tmp_path):
    """tools/upscale.py --decoder: the file is loaded as Load VAE loads it and decodes every chunk (its log says
    so); the output keeps the frame count and is exactly scale x the input size."""
    clip = demo_tool.make_clip(demo_tool.bigbuckbunny(), tmp_path / "clip.mp4", 9, 64, 36)
    output = tmp_path / "out.mp4"
    decoder = models_dir / "vae_approx" / "lighttaew2_1.safetensors"
    done = subprocess.run([sys.executable, "-m", "tools.upscale", "--stand-ins", "--input", clip, "--output", output,
                           "--scale", "2", "--decoder", decoder], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:]
    assert "tiny TAEHV decoder" in done.stdout
    with av.open(str(output)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (72, 128, 3)


def test_tiled_decode_halves_the_tile_when_memory_runs_out(models_dir, monkeypatch, caplog):
    """The Tiled Decode node's back-off: a decoder that runs out of memory on tiles over 16 latent px (fault
    injected into the real TAEHV) is redone at half the tile; the frames are those of a decode at that tile. An
    error that is not an OOM, and an OOM at the smallest tile, reach the user unchanged."""
    vae = load_vae("lighttaew2_1.safetensors")
    decode = vae.first_stage_model.decode

    def small_tiles_only(latent, **kwargs):
        if max(latent.shape[-2:]) > 16:
            raise torch.OutOfMemoryError("injected: out of memory")
        return decode(latent, **kwargs)

    latent = random_latent(16, 2, 24, 24)
    with torch.inference_mode():
        expected = decoders.decode_tiled(vae, latent, 128, 32)
        monkeypatch.setattr(vae.first_stage_model, "decode", small_tiles_only)
        with caplog.at_level("WARNING", logger="LiteVSR"):
            frames = decoders.decode_tiled_fitting(vae, latent, 512, 64)
        torch.testing.assert_close(frames, expected, rtol=0, atol=0)
        assert "retrying with 128 px" in caplog.text
        for error in (ValueError("injected: not memory"), torch.OutOfMemoryError("injected: even the smallest")):
            monkeypatch.setattr(vae.first_stage_model, "decode", lambda *a, error=error, **k: raise_(error))
            with pytest.raises(type(error), match="injected"):
                decoders.decode_tiled_fitting(vae, latent, 128, 32)


def raise_(error):
    raise error
