"""Colour correction of upscaled frames against the LR frames they came from.

Diffusion upscalers drift in colour; these methods pull the output back towards the input. Mean/std statistics
are taken over the whole clip, not per frame: per-frame matching makes brightness flicker from frame to frame.
Frames are processed in batches so memory stays bounded for long clips.
"""
import torch
import torch.nn.functional as F
from einops import rearrange

from .frames import resize_frames

METHODS = ("lab", "wavelet", "adain", "none")
FRAME_BATCH = 16
WAVELET_LEVELS = 5

# sRGB primaries with a D65 white point (IEC 61966-2-1).
_RGB_TO_XYZ = torch.tensor([[0.4124564, 0.3575761, 0.1804375],
                            [0.2126729, 0.7151522, 0.0721750],
                            [0.0193339, 0.1191920, 0.9503041]], dtype=torch.float64)
_D65_WHITE = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)
_LAB_EPSILON = 6.0 / 29.0


def srgb_to_linear(rgb):
    return torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb.clamp_min(0.0) + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(linear):
    return torch.where(linear <= 0.0031308, linear * 12.92, 1.055 * linear.clamp_min(0.0) ** (1.0 / 2.4) - 0.055)


def srgb_to_lab(rgb):
    """`[..., 3]` sRGB in 0..1 -> CIELAB (L in 0..100), D65."""
    xyz = srgb_to_linear(rgb) @ _RGB_TO_XYZ.to(rgb).T / _D65_WHITE.to(rgb)
    f = torch.where(xyz > _LAB_EPSILON ** 3, xyz.clamp_min(0.0) ** (1.0 / 3.0),
                    xyz / (3 * _LAB_EPSILON ** 2) + 4.0 / 29.0)
    fx, fy, fz = f.unbind(-1)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=-1)


def lab_to_srgb(lab):
    """Inverse of `srgb_to_lab`; out-of-gamut colours come back outside 0..1 (the caller clamps)."""
    lightness, a, b = lab.unbind(-1)
    fy = (lightness + 16.0) / 116.0
    f = torch.stack([fy + a / 500.0, fy, fy - b / 200.0], dim=-1)
    xyz = torch.where(f > _LAB_EPSILON, f ** 3, 3 * _LAB_EPSILON ** 2 * (f - 4.0 / 29.0)) * _D65_WHITE.to(lab)
    return linear_to_srgb(xyz @ torch.linalg.inv(_RGB_TO_XYZ).to(lab).T)


def _identity(values):
    return values


# Per method: into the space where channel statistics are matched, and back to sRGB.
_STATISTIC_SPACES = {"lab": (srgb_to_lab, lab_to_srgb), "adain": (_identity, _identity)}


def correct_colour(frames, reference, method, batch_frames=FRAME_BATCH):
    """Correct `frames [N, H, W, 3]` against `reference [N, h, w, 3]` (resized to H x W here)."""
    if method not in METHODS:
        raise ValueError(f"unknown colour correction method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "none":
        return frames
    if frames.shape[0] != reference.shape[0]:
        raise ValueError(f"the upscaled clip has {frames.shape[0]} frames but the reference has "
                         f"{reference.shape[0]}; connect the LR frames the upscaled clip was made from")
    height, width = frames.shape[1:3]
    batches = [slice(start, start + batch_frames) for start in range(0, frames.shape[0], batch_frames)]

    def reference_batch(batch):
        return resize_frames(reference[batch].to(frames), height, width)

    corrected = torch.empty_like(frames)
    if method == "wavelet":
        for batch in batches:
            corrected[batch] = wavelet_transfer(frames[batch], reference_batch(batch))
        return corrected

    to_space, from_space = _STATISTIC_SPACES[method]
    source_mean, source_std = _clip_statistics(to_space(frames[batch].double()) for batch in batches)
    target_mean, target_std = _clip_statistics(to_space(reference_batch(batch).double()) for batch in batches)
    gain = target_std / source_std.clamp_min(1e-6)  # a flat channel stays flat instead of exploding
    for batch in batches:
        values = to_space(frames[batch].double())
        corrected[batch] = from_space((values - source_mean) * gain + target_mean).clamp(0.0, 1.0).to(frames)
    return corrected


def _clip_statistics(batches):
    """Per-channel mean and std over every pixel of every frame, accumulated batch by batch."""
    count, total, total_sq = 0, 0.0, 0.0
    for values in batches:
        values = values.reshape(-1, values.shape[-1])
        count += values.shape[0]
        total = total + values.sum(0)
        total_sq = total_sq + values.square().sum(0)
    mean = total / count
    return mean, (total_sq / count - mean.square()).clamp_min(0.0).sqrt()


def wavelet_bands(frames, levels=WAVELET_LEVELS):
    """Split `[N, H, W, C]` into (high, low): a stack of dilated 3x3 binomial blurs (a trous wavelet)."""
    low = rearrange(frames, "n h w c -> n c h w")
    channels = low.shape[1]
    kernel = torch.tensor([1.0, 2.0, 1.0], dtype=low.dtype, device=low.device)
    kernel = (torch.outer(kernel, kernel) / 16.0).expand(channels, 1, 3, 3)
    high = torch.zeros_like(low)
    for level in range(levels):
        dilation = 2 ** level
        blurred = F.conv2d(F.pad(low, (dilation,) * 4, mode="replicate"), kernel, dilation=dilation,
                           groups=channels)
        high += low - blurred
        low = blurred
    return (rearrange(high, "n c h w -> n h w c"), rearrange(low, "n c h w -> n h w c"))


def wavelet_transfer(frames, reference):
    """Detail (high band) of `frames` on the colour and shading (low band) of a same-size `reference`."""
    detail, _ = wavelet_bands(frames)
    _, base = wavelet_bands(reference)
    return (detail + base).clamp(0.0, 1.0)
