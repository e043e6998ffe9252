"""Colour correction: each method does what its name says, with clip-wide (flicker-free) statistics."""
import pytest
import torch

from comfyui_litevsr.nodes.core.colour import correct_colour, lab_to_srgb, srgb_to_lab, wavelet_bands
from comfyui_litevsr.nodes.core.frames import resize_frames
from comfyui_litevsr.nodes.decode_nodes import LiteVSRColorCorrect

SCALE = 2


def _smooth_clip(count, height, width, seed):
    """Soft random colour fields, like natural LR frames (and unlike noise, safe to resize)."""
    coarse = torch.rand(count, 3, 3, 3, generator=torch.Generator().manual_seed(seed))
    return resize_frames(coarse, height, width)


@pytest.fixture()
def reference():
    return _smooth_clip(5, 24, 32, seed=1)


@pytest.fixture()
def drifted(reference):
    """An 'upscale' with a colour cast, lower contrast and fine texture the reference lacks."""
    upscaled = resize_frames(reference, 24 * SCALE, 32 * SCALE)
    texture = torch.zeros_like(upscaled)
    texture[:, ::2, ::2] = 0.06
    cast = torch.tensor([0.08, -0.05, 0.02])
    return (0.7 * upscaled + 0.1 + cast + texture).clamp(0, 1)


def _stats(values):
    flat = values.reshape(-1, values.shape[-1]).double()
    return flat.mean(0), flat.std(0, unbiased=False)


def test_adain_matches_clip_rgb_statistics(reference, drifted):
    corrected = correct_colour(drifted, reference, "adain")
    target = resize_frames(reference, *drifted.shape[1:3])
    for got, want in zip(_stats(corrected), _stats(target)):
        torch.testing.assert_close(got, want, atol=5e-3, rtol=0)
    assert (_stats(drifted)[0] - _stats(target)[0]).abs().max() > 0.05  # there was something to correct


def test_lab_matches_clip_lab_statistics(reference, drifted):
    corrected = correct_colour(drifted, reference, "lab")
    target = resize_frames(reference, *drifted.shape[1:3])
    for got, want in zip(_stats(srgb_to_lab(corrected.double())), _stats(srgb_to_lab(target.double()))):
        # Lab units (L in 0..100); the residue is the final clamp to the sRGB gamut, under one JND (~2.3)
        torch.testing.assert_close(got, want, atol=2.0, rtol=0)
    assert (_stats(srgb_to_lab(drifted.double()))[0] - _stats(srgb_to_lab(target.double()))[0]).abs().max() > 5


def test_lab_round_trip_and_known_values():
    colours = torch.rand(1000, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(lab_to_srgb(srgb_to_lab(colours)), colours, atol=1e-9, rtol=0)
    white_and_blue = srgb_to_lab(torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 1.0]], dtype=torch.float64))
    # CIELAB D65 reference values: white (100, 0, 0), sRGB blue (32.30, 79.19, -107.86)
    torch.testing.assert_close(white_and_blue, torch.tensor([[100.0, 0, 0], [32.30, 79.19, -107.86]],
                                                            dtype=torch.float64), atol=0.05, rtol=0)


def test_lab_keeps_saturated_blue_blue():
    # Peer bug: blue output turned purple after Lab correction. A darker, noisy blue corrected towards blue must
    # stay blue: blue channel dominant, red and green low.
    generator = torch.Generator().manual_seed(0)
    reference = (torch.tensor([0.05, 0.1, 0.9]) + 0.03 * torch.randn(3, 8, 8, 3, generator=generator)).clamp(0, 1)
    output = (torch.tensor([0.1, 0.1, 0.6]) + 0.05 * torch.randn(3, 16, 16, 3, generator=generator)).clamp(0, 1)
    red, green, blue = correct_colour(output, reference, "lab").mean(dim=(0, 1, 2))
    assert blue > 0.8 and red < 0.15 and green < 0.2 and red < green + 0.05


def test_wavelet_takes_low_band_from_reference_and_keeps_the_detail(reference, drifted):
    corrected = correct_colour(drifted, reference, "wavelet")
    target = resize_frames(reference, *drifted.shape[1:3])
    detail_in, low_in = wavelet_bands(drifted)
    detail_out, low_out = wavelet_bands(corrected)
    _, low_target = wavelet_bands(target)
    low_error = (low_out - low_target).abs().mean()
    # The cast lives in the low band and is gone; not to zero, as a blur stack is not an exact band projection.
    assert low_error < 0.25 * (low_in - low_target).abs().mean()
    # The texture is kept (the residue: the reference's own share of the fine band, and the clamp)
    assert (detail_out - detail_in).abs().mean() < 0.2 * detail_in.abs().mean()


def test_none_is_bit_identical(reference, drifted):
    assert torch.equal(correct_colour(drifted, reference, "none"), drifted)


@pytest.mark.parametrize("method", ["lab", "adain"])
def test_statistics_are_per_clip_not_per_frame(method):
    # A fade: frame brightness rises through the clip. Per-frame matching would flatten it (flicker on real
    # footage); clip-wide matching keeps the frames' relative brightness.
    fade = torch.linspace(0.2, 0.8, 6).reshape(6, 1, 1, 1)
    reference = (_smooth_clip(6, 12, 12, seed=2) * 0.3 + fade).clamp(0, 1)
    output = (resize_frames(reference, 24, 24) * 0.8 + 0.05).clamp(0, 1)
    corrected = correct_colour(output, reference, method, batch_frames=4)  # statistics span batches too
    frame_means = corrected.mean(dim=(1, 2, 3))
    reference_means = resize_frames(reference, 24, 24).mean(dim=(1, 2, 3))
    torch.testing.assert_close(frame_means, reference_means, atol=0.03, rtol=0)
    assert frame_means[-1] - frame_means[0] > 0.4


def test_node_checks_frame_counts_and_method(reference, drifted):
    with pytest.raises(ValueError, match="same|frames"):
        LiteVSRColorCorrect.execute(drifted[:3], reference, "lab")
    with pytest.raises(ValueError, match="choose one of"):
        correct_colour(drifted, reference, "histogram")
    assert LiteVSRColorCorrect.execute(drifted, reference, "adain").result[0].shape == drifted.shape
