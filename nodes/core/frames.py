"""The frame/size contract: resize LR frames, pad them onto the VAE/DiT grid, crop the result back exactly.

Frames are ComfyUI IMAGE tensors `[N, H, W, C]`, float in 0..1.
"""
import torch
import torch.nn.functional as F
from einops import rearrange

from .geometry import frames_on_grid, round_up


def resize_frames(frames, height, width):
    """Bicubic resize with antialiasing (so downscaling a reference does not alias), clamped to 0..1."""
    if frames.shape[1:3] == (height, width):
        return frames
    channels_first = rearrange(frames, "n h w c -> n c h w")
    resized = F.interpolate(channels_first, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return rearrange(resized, "n c h w -> n h w c").clamp(0.0, 1.0)


def pad_for_encode(frames, grid_px, frame_count=None):
    """Replicate-pad bottom/right to multiples of `grid_px` and repeat the last frame up to 4n+1 frames
    (`frame_count` frames where given: a causal stream's later chunks are 4n).

    Replication (not zeros) keeps the padded border free of edges the VAE and DiT would otherwise spend detail on.
    """
    count, height, width = frames.shape[:3]
    pad_bottom = round_up(height, grid_px) - height
    pad_right = round_up(width, grid_px) - width
    if pad_bottom or pad_right:
        channels_first = rearrange(frames, "n h w c -> n c h w")
        channels_first = F.pad(channels_first, (0, pad_right, 0, pad_bottom), mode="replicate")
        frames = rearrange(channels_first, "n c h w -> n h w c")
    extra_frames = (frame_count or frames_on_grid(count)) - count
    if extra_frames:
        frames = torch.cat([frames, frames[-1:].expand(extra_frames, -1, -1, -1)], dim=0)
    return frames


def crop_to(frames, count, height, width):
    """Exact crop back to the original frame count and size (undoes `pad_for_encode`)."""
    if frames.shape[0] < count or frames.shape[1] < height or frames.shape[2] < width:
        raise ValueError(f"cannot crop frames of shape {tuple(frames.shape[:3])} to {(count, height, width)}: "
                         "the decoded video is smaller than the size recorded at encode time")
    return frames[:count, :height, :width]
