"""Real-world video degradation (RealBasicVSR / Real-ESRGAN second order) for synthesising LR training clips.

`degrade_clip` takes an HR clip `[T, H, W, 3]` in 0..1 and returns the LR clip `[T, H // scale, W // scale, 3]`.
The stage functions below work on channels-first clips `[T, 3, H, W]`.

Every random parameter is drawn once per clip from one seeded numpy Generator and held over all frames
(as RealBasicVSR's and DOVE's video degradations do): a real video has one camera, one encoder setting. Only the
noise itself differs per frame; its torch seed is a sampled parameter too. Sampling gives a plain JSON-able dict
and applying reads only that dict, so a logged parameter set reproduces its degradation bit for bit.
"""
import io
import math
from dataclasses import dataclass, replace

import av
import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso", "sinc")
KERNEL_SIZES = tuple(range(7, 22, 2))
RESIZE_MODES = ("bilinear", "area", "bicubic")
CODECS = ("libx264", "h264", "mpeg4")
CODEC_FPS = 1  # bitrates are per second at this rate, so a bitrate is the bit budget of one frame (as RealBasicVSR)
CODEC_MIN_SIDE = 16  # encoders want even sizes and dislike tiny frames: smaller clips are edge-padded up to this
_LUMA = (0.299, 0.587, 0.114)  # BT.601, for gray (luminance-only) noise


@dataclass(frozen=True)
class CompressionConfig:
    """The JPEG and video-codec ranges, common to a degradation stage and the final step."""

    jpeg_prob: float = 1.0
    jpeg_quality: tuple = (30, 95)
    codec_prob: float = 1.0
    codecs: tuple = CODECS
    bitrate: tuple = (1e4, 1e5)


@dataclass(frozen=True)
class StageConfig(CompressionConfig):
    """One order of degradation: blur, resize, noise, then JPEG and codec (stage 1 only in the presets)."""

    blur_prob: float = 1.0
    kernel_probs: tuple = (0.405, 0.225, 0.108, 0.027, 0.108, 0.027, 0.1)  # in KERNEL_TYPES order
    kernel_sizes: tuple = KERNEL_SIZES
    blur_sigma: tuple = (0.2, 3.0)
    beta_gaussian: tuple = (0.5, 4.0)
    beta_plateau: tuple = (1.0, 2.0)
    resize_probs: tuple = (0.2, 0.7, 0.1)  # up, down, keep
    resize_scale: tuple = (0.15, 1.5)
    resize_modes: tuple = RESIZE_MODES
    noise_prob: float = 1.0
    gaussian_noise_prob: float = 0.5  # otherwise Poisson
    noise_sigma: tuple = (1.0, 30.0)  # on the 0..255 scale
    poisson_scale: tuple = (0.05, 3.0)
    gray_noise_prob: float = 0.4


@dataclass(frozen=True)
class FinalConfig(CompressionConfig):
    """Resize to the LR size with a sinc filter, and JPEG, in random order; then the codec."""

    sinc_prob: float = 0.8
    sinc_omega: tuple = (math.pi / 3, math.pi)
    kernel_sizes: tuple = KERNEL_SIZES
    resize_modes: tuple = RESIZE_MODES


@dataclass(frozen=True)
class DegradationConfig:
    stage1: StageConfig = StageConfig()
    stage2: StageConfig = StageConfig(blur_prob=0.8, blur_sigma=(0.2, 1.5), resize_probs=(0.3, 0.4, 0.3),
                                      resize_scale=(0.3, 1.2), noise_sigma=(1.0, 25.0), poisson_scale=(0.05, 2.5),
                                      jpeg_prob=0.0, codec_prob=0.0)
    final: FinalConfig = FinalConfig()

    @classmethod
    def preset(cls, name):
        if name not in PRESETS:
            raise ValueError(f"unknown degradation preset {name!r}; choose one of {', '.join(PRESETS)}")
        return PRESETS[name]


def _light():
    standard = DegradationConfig()
    return DegradationConfig(
        stage1=replace(standard.stage1, blur_sigma=(0.2, 1.5), resize_scale=(0.5, 1.5), noise_sigma=(1.0, 10.0),
                       poisson_scale=(0.05, 1.0), jpeg_quality=(60, 95), codec_prob=0.0),
        stage2=replace(standard.stage2, blur_prob=0.5, blur_sigma=(0.2, 1.0), resize_scale=(0.7, 1.2),
                       noise_prob=0.5, noise_sigma=(1.0, 5.0), poisson_scale=(0.05, 0.5)),
        final=replace(standard.final, sinc_prob=0.5, jpeg_quality=(70, 95), codec_prob=0.3, bitrate=(5e4, 2e5)))


def _heavy():
    standard = DegradationConfig()
    return DegradationConfig(
        stage1=replace(standard.stage1, blur_sigma=(0.5, 4.0), resize_probs=(0.1, 0.8, 0.1),
                       resize_scale=(0.15, 1.2), noise_sigma=(5.0, 40.0), poisson_scale=(0.5, 4.0),
                       jpeg_quality=(20, 70), bitrate=(5e3, 5e4)),
        stage2=replace(standard.stage2, blur_prob=1.0, blur_sigma=(0.5, 2.0), noise_sigma=(3.0, 30.0),
                       poisson_scale=(0.3, 3.0)),
        final=replace(standard.final, sinc_prob=0.9, jpeg_quality=(20, 70), bitrate=(5e3, 5e4)))


PRESETS = {"light": _light(), "standard": DegradationConfig(), "heavy": _heavy()}


def with_overrides(config, overrides):
    """`config` with fields replaced per part, e.g. {"stage1": {"blur_sigma": [0.2, 2.0]}, "final": {...}}; every
    range of every part can be set. Unknown parts or fields are refused with the valid names."""
    config = DegradationConfig.preset(config) if isinstance(config, str) else config
    parts = {}
    for part, fields in (overrides or {}).items():
        current = getattr(config, part, None)
        if part not in ("stage1", "stage2", "final") or not isinstance(fields, dict):
            raise ValueError(f"degradation overrides: {part!r} is not a part; use stage1, stage2 or final, each "
                             "mapping field names to values")
        valid = set(current.__dataclass_fields__)
        unknown = sorted(set(fields) - valid)
        if unknown:
            raise ValueError(f"degradation overrides: unknown {part} field(s) {', '.join(unknown)}; valid: "
                             f"{', '.join(sorted(valid))}")
        parts[part] = replace(current, **{name: _override_value(part, name, getattr(current, name), value)
                                          for name, value in fields.items()})
    return replace(config, **parts)


def _override_value(part, name, default, value):
    if isinstance(default, tuple):
        fixed_length = name not in ("codecs", "kernel_sizes", "resize_modes")
        if not isinstance(value, (list, tuple)) or (fixed_length and len(value) != len(default)):
            raise ValueError(f"degradation overrides: {part}.{name} takes a list like {list(default)}, got {value!r}")
        return tuple(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"degradation overrides: {part}.{name} takes a number like {default}, got {value!r}")
    return value


# --- blur kernels -------------------------------------------------------------------------------------------------

def _kernel_grid(size):
    offsets = torch.arange(size, dtype=torch.float64) - size // 2
    return torch.meshgrid(offsets, offsets, indexing="xy")  # (x, y), each [size, size]


def _mahalanobis_squared(size, sigma_x, sigma_y, angle):
    """x^T Sigma^-1 x on the kernel grid, Sigma = R(angle) diag(sigma_x^2, sigma_y^2) R(angle)^T."""
    x, y = _kernel_grid(size)
    along = math.cos(angle) * x + math.sin(angle) * y  # coordinates in the rotated principal axes
    across = -math.sin(angle) * x + math.cos(angle) * y
    return (along / sigma_x) ** 2 + (across / sigma_y) ** 2


def _circular_lowpass(size, omega):
    """Ideal low-pass with cutoff `omega` (rad/pixel) over a disc: omega J1(omega r) / (2 pi r)."""
    x, y = _kernel_grid(size)
    radius = torch.sqrt(x ** 2 + y ** 2)
    safe_radius = torch.where(radius > 0, radius, torch.ones_like(radius))
    ring = omega * torch.special.bessel_j1(omega * safe_radius) / (2 * math.pi * safe_radius)
    return torch.where(radius > 0, ring, torch.full_like(radius, omega ** 2 / (4 * math.pi)))


def make_kernel(params):
    """The normalised `[size, size]` float32 kernel that a sampled blur or sinc parameter dict describes."""
    kind, size = params["type"], params["size"]
    if kind == "sinc":
        kernel = _circular_lowpass(size, params["omega"])
    else:
        distance = _mahalanobis_squared(size, params["sigma_x"], params["sigma_y"], params["angle"])
        if kind.startswith("generalized"):
            kernel = torch.exp(-0.5 * distance ** params["beta"])
        elif kind.startswith("plateau"):
            kernel = 1.0 / (1.0 + distance ** params["beta"])
        else:
            kernel = torch.exp(-0.5 * distance)
    return (kernel / kernel.sum()).float()


def _sinc_params(rng, sizes, omega_range=None):
    size = int(rng.choice(sizes))
    # small supports cannot hold the ripples of a very low cutoff; Real-ESRGAN limits omega the same way
    low, high = omega_range or ((math.pi / 3, math.pi) if size < 13 else (math.pi / 5, math.pi))
    return {"type": "sinc", "size": size, "omega": float(rng.uniform(low, high))}


def sample_blur(rng, config):
    """Blur parameters for one stage, or None when the stage draws no blur."""
    if rng.random() >= config.blur_prob:
        return None
    probs = np.asarray(config.kernel_probs, dtype=np.float64)
    kind = KERNEL_TYPES[rng.choice(len(KERNEL_TYPES), p=probs / probs.sum())]
    if kind == "sinc":
        return _sinc_params(rng, config.kernel_sizes)
    size = int(rng.choice(config.kernel_sizes))
    sigma_x = float(rng.uniform(*config.blur_sigma))
    isotropic = not kind.endswith("aniso")
    sigma_y = sigma_x if isotropic else float(rng.uniform(*config.blur_sigma))
    angle = 0.0 if isotropic else float(rng.uniform(-math.pi, math.pi))
    params = {"type": kind, "size": size, "sigma_x": sigma_x, "sigma_y": sigma_y, "angle": angle}
    if kind.startswith("generalized"):
        params["beta"] = float(rng.uniform(*config.beta_gaussian))
    elif kind.startswith("plateau"):
        params["beta"] = float(rng.uniform(*config.beta_plateau))
    return params


def blur(clip, kernel):
    """Depthwise convolution of every channel of `[T, 3, H, W]` with one `[k, k]` kernel, reflect padding."""
    pad = kernel.shape[-1] // 2
    # reflect padding needs the frame to be larger than the pad; tiny frames (after a strong downscale) replicate
    mode = "reflect" if pad < min(clip.shape[-2:]) else "replicate"
    padded = F.pad(clip, (pad, pad, pad, pad), mode=mode)
    channels = clip.shape[1]
    weight = kernel.to(clip).expand(channels, 1, -1, -1)
    return F.conv2d(padded, weight, groups=channels)


# --- resize ---------------------------------------------------------------------------------------------------------

def sample_resize(rng, config):
    direction = ("up", "down", "keep")[rng.choice(3, p=np.asarray(config.resize_probs) / sum(config.resize_probs))]
    low, high = config.resize_scale
    if direction == "up":
        scale = rng.uniform(1.0, high)
    elif direction == "down":
        scale = rng.uniform(low, 1.0)
    else:
        scale = 1.0
    return {"direction": direction, "scale": float(scale), "mode": str(rng.choice(config.resize_modes))}


def resize(clip, height, width, mode):
    """No antialiasing on purpose: aliasing from a careless downscale is one of the degradations."""
    if clip.shape[-2:] == (height, width):
        return clip
    corners = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(clip, size=(height, width), mode=mode, **corners).clamp(0.0, 1.0)


def _scaled_size(height, width, scale):
    return max(2, round(height * scale)), max(2, round(width * scale))


# --- noise ----------------------------------------------------------------------------------------------------------

def sample_noise(rng, config):
    if rng.random() >= config.noise_prob:
        return None
    gaussian = rng.random() < config.gaussian_noise_prob
    params = {"type": "gaussian" if gaussian else "poisson", "gray": bool(rng.random() < config.gray_noise_prob)}
    if gaussian:
        params["sigma"] = float(rng.uniform(*config.noise_sigma))
    else:
        params["scale"] = float(rng.uniform(*config.poisson_scale))
    params["seed"] = int(rng.integers(2 ** 62))
    return params


def _luma(clip):
    weights = torch.tensor(_LUMA, dtype=clip.dtype, device=clip.device).view(1, 3, 1, 1)
    return (clip * weights).sum(dim=1, keepdim=True)


def add_gaussian_noise(clip, sigma, gray, seed):
    """Fresh noise in every frame; `sigma` on the 0..255 scale; gray noise is one field shared by R, G, B."""
    frames, channels, height, width = clip.shape
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(frames, 1 if gray else channels, height, width, generator=generator)
    return (clip + noise.to(clip) * (sigma / 255.0)).clamp(0.0, 1.0)


def add_poisson_noise(clip, scale, gray, seed):
    """Shot noise of 8-bit photon counts, its amplitude multiplied by `scale`: variance grows with intensity."""
    generator = torch.Generator().manual_seed(seed)
    signal = (_luma(clip) if gray else clip).clamp(0.0, 1.0).cpu()
    counts = torch.poisson(signal * 255.0, generator=generator) / 255.0
    noise = (counts - signal).to(clip) * scale
    return (clip + noise).clamp(0.0, 1.0)


def apply_noise(clip, params):
    if params["type"] == "gaussian":
        return add_gaussian_noise(clip, params["sigma"], params["gray"], params["seed"])
    return add_poisson_noise(clip, params["scale"], params["gray"], params["seed"])


# --- JPEG and video codec -----------------------------------------------------------------------------------------

def to_uint8_frames(clip):
    return (rearrange(clip, "t c h w -> t h w c").clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).cpu().numpy()


def _from_uint8_frames(frames, like):
    clip = torch.from_numpy(np.stack(frames)).to(device=like.device, dtype=like.dtype) / 255.0
    return rearrange(clip, "t h w c -> t c h w")


def sample_jpeg(rng, prob, quality_range):
    if rng.random() >= prob:
        return None
    return {"quality": int(rng.integers(quality_range[0], quality_range[1] + 1))}


def jpeg(clip, quality):
    """Pillow JPEG encode/decode of every frame at one quality (4:2:0 chroma, as cameras and the web do)."""
    decoded = []
    for frame in to_uint8_frames(clip):
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        with Image.open(buffer) as image:
            decoded.append(np.asarray(image.convert("RGB")))
    return _from_uint8_frames(decoded, clip)


def available_codecs(names=CODECS):
    """The encoders of `names` that this PyAV build has ("h264" resolves to whichever H.264 encoder it ships)."""
    usable = []
    for name in names:
        try:
            av.codec.Codec(name, "w")
        except Exception:  # PyAV raises different types across versions for an unknown encoder
            continue
        usable.append(name)
    return tuple(usable)


def sample_codec(rng, prob, codecs, bitrate_range):
    usable = available_codecs(codecs)
    if not usable or rng.random() >= prob:
        return None
    return {"codec": str(rng.choice(usable)), "bitrate": int(rng.integers(int(bitrate_range[0]),
                                                                        int(bitrate_range[1]) + 1))}


def pad_for_codec(frames):
    """Edge-pad `[T, H, W, 3]` uint8 to even sides of at least CODEC_MIN_SIDE (yuv420p halves the chroma)."""
    height, width = frames.shape[1:3]
    pad_h = max(CODEC_MIN_SIDE, height + height % 2) - height
    pad_w = max(CODEC_MIN_SIDE, width + width % 2) - width
    return np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")


# x264 settings for a reproducible encode. One thread: a threaded encode depends on scheduling. No MB-tree: on a CPU
# with AVX-512, x264's MB-tree kernels (mbtree_propagate_cost/_list_avx512) work on 16 and 8 macroblocks at a time
# with no tail mask, so unless the width in macroblocks is a multiple of 8 every row also propagates up to 7 phantom
# macroblocks past its end. Their propagate amount comes from the cost buffer of a non-reference B-frame beyond the
# one row x264 zeroes, i.e. uninitialised heap, and a phantom with a slightly leftward vector lands on the real
# rightmost column. The garbage reaches the qp offsets, so the bitstream changed with whatever the heap held (run to
# run, test order, MALLOC_PERTURB_). Rate control stays ABR at the sampled bitrate; only MB-tree's qp shift is off.
X264_PARAMS = "threads=1:lookahead-threads=1:sliced-threads=0:mbtree=0"


def encode(frames, codec, bitrate):
    buffer = io.BytesIO()
    # bitexact: matroska otherwise writes random segment and track UIDs (no effect on the decoded frames)
    with av.open(buffer, "w", format="matroska", container_options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(codec, rate=CODEC_FPS)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = bitrate
        stream.codec_context.thread_count = 1  # one thread: the same bytes on every run and machine
        if stream.codec_context.name == "libx264":
            stream.options = {"x264-params": X264_PARAMS}
        for index, frame in enumerate(frames):
            picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24").reformat(format="yuv420p")
            picture.pts = index
            container.mux(stream.encode(picture))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def _decode(data):
    with av.open(io.BytesIO(data), "r") as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def compress_video(clip, codec, bitrate):
    """Encode `[T, 3, H, W]` with a real video encoder at `bitrate` (bits per frame, see CODEC_FPS) and decode it."""
    frames = to_uint8_frames(clip)
    height, width = frames.shape[1:3]
    decoded = _decode(encode(pad_for_codec(frames), codec, bitrate))
    if len(decoded) != len(frames):
        raise RuntimeError(f"{codec} round trip returned {len(decoded)} frames for {len(frames)}")
    return _from_uint8_frames([frame[:height, :width] for frame in decoded], clip)


# --- the pipeline ---------------------------------------------------------------------------------------------------

def _sample_stage(rng, config):
    return {"blur": sample_blur(rng, config), "resize": sample_resize(rng, config), "noise": sample_noise(rng, config),
            "jpeg": sample_jpeg(rng, config.jpeg_prob, config.jpeg_quality),
            "codec": sample_codec(rng, config.codec_prob, config.codecs, config.bitrate)}


def _sample_final(rng, config):
    return {"order": str(rng.choice(("resize_first", "jpeg_first"))), "mode": str(rng.choice(config.resize_modes)),
            "sinc": (_sinc_params(rng, config.kernel_sizes, config.sinc_omega)
                     if rng.random() < config.sinc_prob else None),
            "jpeg": sample_jpeg(rng, config.jpeg_prob, config.jpeg_quality),
            "codec": sample_codec(rng, config.codec_prob, config.codecs, config.bitrate)}


def sample_degradation(config, seed):
    """Every random choice for one clip, as a JSON-able dict; the same (config, seed) gives the same dict."""
    config = DegradationConfig.preset(config) if isinstance(config, str) else config
    rng = np.random.default_rng(seed)
    return {"stage1": _sample_stage(rng, config.stage1), "stage2": _sample_stage(rng, config.stage2),
            "final": _sample_final(rng, config.final)}


def _apply_stage(clip, params, size):
    if params["blur"]:
        clip = blur(clip, make_kernel(params["blur"]))
    clip = resize(clip, *_scaled_size(*size, params["resize"]["scale"]), params["resize"]["mode"])
    if params["noise"]:
        clip = apply_noise(clip, params["noise"])
    if params["jpeg"]:
        clip = jpeg(clip, params["jpeg"]["quality"])
    if params["codec"]:
        clip = compress_video(clip, params["codec"]["codec"], params["codec"]["bitrate"])
    return clip


def _resize_with_sinc(clip, size, params):
    clip = resize(clip, *size, params["mode"])
    if params["sinc"]:
        clip = blur(clip, make_kernel(params["sinc"])).clamp(0.0, 1.0)
    return clip


def _apply_final(clip, params, size):
    jpeg_step = (lambda c: jpeg(c, params["jpeg"]["quality"])) if params["jpeg"] else (lambda c: c)
    if params["order"] == "resize_first":
        clip = jpeg_step(_resize_with_sinc(clip, size, params))
    else:
        clip = _resize_with_sinc(jpeg_step(clip), size, params)
    if params["codec"]:
        clip = compress_video(clip, params["codec"]["codec"], params["codec"]["bitrate"])
    return clip


def lr_size(height, width, scale):
    if height // scale < 1 or width // scale < 1:
        raise ValueError(f"a {width}x{height} clip is too small for a {scale}x degradation")
    return height // scale, width // scale


def apply_degradation(hr, scale, params):
    """HR `[T, H, W, 3]` in 0..1 -> LR `[T, H // scale, W // scale, 3]` float32 in 0..1, from sampled params.

    Stage 1 resizes relative to the HR size, stage 2 relative to the LR size (as Real-ESRGAN), so stage 2's
    scale range reads as "around the target"."""
    height, width = hr.shape[1:3]
    target = lr_size(height, width, scale)
    clip = rearrange(hr.float().clamp(0.0, 1.0), "t h w c -> t c h w")
    clip = _apply_stage(clip, params["stage1"], (height, width))
    clip = _apply_stage(clip, params["stage2"], target)
    clip = _apply_final(clip, params["final"], target)
    return rearrange(clip.clamp(0.0, 1.0), "t c h w -> t h w c").contiguous()


def degrade_clip(hr, scale, config="standard", seed=0):
    """Synthesise the LR clip for an HR clip; returns `(lr, params)` (params: the sampled dict, for logs)."""
    params = sample_degradation(config, seed)
    return apply_degradation(hr, scale, params), params
