"""Random HR training clips from a folder of videos (mp4/mkv/mov/webm through PyAV, animated webp through Pillow).

Files are probed once, cheaply (container metadata, one decoded frame), when the dataset is built; unusable ones
are skipped with one warning that lists them. A clip decodes only its own frames: PyAV seeks to the keyframe
before the start and decodes forward, so a long file never sits in memory.
"""
import logging
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

from .geometry import frames_on_grid
from .video_io import count_frames

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".webm")
IMAGE_SUFFIXES = (".webp",)


@dataclass(frozen=True)
class ClipLocation:
    path: Path
    start: int  # first source frame
    crop: tuple  # (top, left, height, width)


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    frames: int
    height: int
    width: int


def _is_candidate(path):
    return path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES + IMAGE_SUFFIXES


def _probe_video(path):
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        first = next(container.decode(stream), None)  # proves the stream decodes, gives the true frame size
        if first is None:
            raise ValueError("no decodable frame")
        container.seek(0)
        return VideoInfo(path, count_frames(container, stream), first.height, first.width)


def _probe_webp(path):
    with Image.open(path) as image:
        image.load()  # decodes the first frame: a truncated or fake file fails here, not mid-training
        return VideoInfo(path, getattr(image, "n_frames", 1), image.height, image.width)


def probe(path):
    """Frame count and size of one file; raises on anything PyAV or Pillow cannot read."""
    return _probe_webp(path) if path.suffix.lower() in IMAGE_SUFFIXES else _probe_video(path)


def _take_every(frames, count, stride, crop):
    """The first `count` of every `stride`-th frame of an iterator of av.VideoFrame, cropped, as uint8 arrays."""
    top, left, height, width = crop
    picked = []
    for index, frame in enumerate(frames):
        if index % stride == 0:
            picked.append(frame.to_ndarray(format="rgb24")[top:top + height, left:left + width].copy())
            if len(picked) == count:
                break
    return picked


def _frames_from_timestamp(container, stream, start, count, stride, crop):
    """Seek to the keyframe before frame `start` (located by the nominal frame rate) and decode forward."""
    rate = stream.average_rate or stream.guessed_rate
    origin = stream.start_time or 0
    target = origin + int(start / (rate * stream.time_base))
    half_frame = 1 / (2 * rate * stream.time_base)
    container.seek(target, stream=stream, backward=True)
    frames = (frame for frame in container.decode(stream)
              if frame.pts is not None and frame.pts >= target - half_frame)
    return _take_every(frames, count, stride, crop)


def _frames_by_counting(container, stream, start, count, stride, crop):
    container.seek(stream.start_time or 0, stream=stream, backward=True)
    frames = (frame for index, frame in enumerate(container.decode(stream)) if index >= start)
    return _take_every(frames, count, stride, crop)


def read_video_clip(path, start, count, stride, crop):
    """`count` frames from frame `start`, every `stride`-th, cropped to (top, left, height, width): uint8 list."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        picked = _frames_from_timestamp(container, stream, start, count, stride, crop)
        if len(picked) < count:  # timestamps off the nominal rate (variable frame rate): count frames instead
            picked = _frames_by_counting(container, stream, start, count, stride, crop)
    return picked


def read_webp_clip(path, start, count, stride, crop):
    top, left, height, width = crop
    picked = []
    with Image.open(path) as image:
        for index in range(start, start + count * stride, stride):
            image.seek(index)
            picked.append(np.asarray(image.convert("RGB"))[top:top + height, left:left + width].copy())
    return picked


def _crop_size(crop_size):
    height, width = (crop_size, crop_size) if isinstance(crop_size, int) else crop_size
    if height < 1 or width < 1:
        raise ValueError(f"crop size must be positive, got {crop_size}")
    return int(height), int(width)


def check_clip_frames(clip_frames):
    if clip_frames < 1 or frames_on_grid(clip_frames) != clip_frames:
        raise ValueError(f"clip_frames must be 4n+1 (the Wan VAE's frame grid), got {clip_frames}; "
                         f"the nearest valid counts are {frames_on_grid(max(clip_frames, 1)) - 4} and "
                         f"{frames_on_grid(max(clip_frames, 1))}")


class VideoClipDataset:
    """Random clips `[clip_frames, crop_h, crop_w, 3]` float32 in 0..1 from every usable video under `folder`.

    `sample(step)` is a pure function of (seed, step): the same step gives the same clip on every run and in every
    worker, and a run resumed at step N sees the clips it would have seen.
    """

    def __init__(self, folder, clip_frames, crop_size, frame_stride=1, seed=0):
        check_clip_frames(clip_frames)
        if frame_stride < 1:
            raise ValueError(f"frame_stride must be at least 1, got {frame_stride}")
        self.folder = Path(folder)
        self.clip_frames, self.frame_stride, self.seed = clip_frames, frame_stride, seed
        self.crop_height, self.crop_width = _crop_size(crop_size)
        self.span = (clip_frames - 1) * frame_stride + 1  # source frames one clip covers
        self.videos, self.skipped = self._scan()

    def _requirement(self):
        return (f"at least {self.span} frames ({self.clip_frames} at stride {self.frame_stride}) and at least "
                f"{self.crop_width}x{self.crop_height} pixels")

    def _why_unusable(self, info):
        if info.frames < self.span:
            return f"too short: {info.frames} frames, {self.span} needed"
        if info.height < self.crop_height or info.width < self.crop_width:
            return f"too small: {info.width}x{info.height}, crop is {self.crop_width}x{self.crop_height}"
        return None

    def _scan(self):
        if not self.folder.is_dir():
            raise ValueError(f"training video folder {self.folder} does not exist or is not a folder")
        candidates = sorted(path for path in self.folder.rglob("*") if _is_candidate(path))
        videos, skipped = [], []
        for path in candidates:
            try:
                info = probe(path)
            except Exception as error:  # PyAV and Pillow raise many types for a broken file; all mean "skip it"
                skipped.append((path, f"unreadable: {error}"))
                continue
            reason = self._why_unusable(info)
            if reason:
                skipped.append((path, reason))
            else:
                videos.append(info)
        if skipped:
            log.warning("skipped %d of %d files in %s:\n%s", len(skipped), len(candidates), self.folder,
                        "\n".join(f"  {path}: {reason}" for path, reason in skipped))
        if not videos:
            found = f"none of its {len(candidates)} video files is usable" if candidates else "it has no video files"
            raise ValueError(f"no training clips in {self.folder}: {found}. Needed: "
                             f"{'/'.join(VIDEO_SUFFIXES + IMAGE_SUFFIXES)} files with {self._requirement()}.")
        return videos, skipped

    def _rng(self, index_or_rng):
        if isinstance(index_or_rng, np.random.Generator):
            return index_or_rng
        return np.random.default_rng([self.seed, int(index_or_rng)])

    def locate(self, index_or_rng):
        """Where one random clip lies: a random file, start frame and crop, from the generator or from (seed, step)."""
        rng = self._rng(index_or_rng)
        info = self.videos[rng.integers(len(self.videos))]
        start = int(rng.integers(info.frames - self.span + 1))
        top = int(rng.integers(info.height - self.crop_height + 1))
        left = int(rng.integers(info.width - self.crop_width + 1))
        return ClipLocation(info.path, start, (top, left, self.crop_height, self.crop_width))

    def sample(self, index_or_rng):
        """One random clip `[clip_frames, crop_h, crop_w, 3]` float32 in 0..1 (see `locate`)."""
        where = self.locate(index_or_rng)
        reader = read_webp_clip if where.path.suffix.lower() in IMAGE_SUFFIXES else read_video_clip
        frames = reader(where.path, where.start, self.clip_frames, self.frame_stride, where.crop)
        if len(frames) < self.clip_frames:
            raise RuntimeError(f"{where.path} gave {len(frames)} frames from frame {where.start}, "
                               f"{self.clip_frames} wanted")
        return torch.from_numpy(np.stack(frames)).float() / 255.0

    def __getitem__(self, step):
        """Map-style access for torch's DataLoader with a sampler over steps (workers then prefetch clips)."""
        return self.sample(step)
