"""The training clip dataset on a folder of real short clips (cut from bigbuckbunny) mixed with bad files."""
import logging
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from tools.demo import bigbuckbunny
from PIL import Image

from comfyui_litevsr.nodes.core import dataset as dataset_module
from comfyui_litevsr.nodes.core.dataset import VideoClipDataset

WIDTH, HEIGHT = 160, 90
CROP = (32, 48)
GOOD = ("sub/a.mp4", "b.mkv", "c.webm", "d.webp")
BAD = ("short.mp4", "broken.mp4", "empty.mov", "small.mkv")


@pytest.fixture(scope="module")
def source_frames():
    """The first 30 frames of bigbuckbunny at 160x90, uint8 `[30, 90, 160, 3]`."""
    frames = []
    with av.open(str(bigbuckbunny())) as container:
        for frame in container.decode(video=0):
            frames.append(frame.reformat(width=WIDTH, height=HEIGHT, format="rgb24").to_ndarray())
            if len(frames) == 30:
                break
    return np.stack(frames)


def write_video(path, frames, codec, container_format=None, gop=None):
    with av.open(str(path), "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=Fraction(25))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        if gop:
            stream.codec_context.gop_size = gop  # keyframes inside the clip, so reads really seek
        for index, frame in enumerate(frames):
            picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            picture.pts = index
            container.mux(stream.encode(picture))
        container.mux(stream.encode(None))


def write_webp(path, frames):
    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=40, quality=90)


def webm_codec():
    for name in ("libvpx-vp9", "libvpx"):
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:
            continue
    pytest.skip("this PyAV has no VP8/VP9 encoder")


@pytest.fixture(scope="module")
def folder(tmp_path_factory, source_frames):
    root = tmp_path_factory.mktemp("videos")
    (root / "sub").mkdir()
    write_video(root / "sub" / "a.mp4", source_frames, "libx264", gop=4)
    write_video(root / "b.mkv", source_frames[:20], "libx264", "matroska")
    write_video(root / "c.webm", source_frames[:17], webm_codec(), "webm")
    write_webp(root / "d.webp", source_frames[:12])
    write_video(root / "short.mp4", source_frames[:5], "libx264")
    (root / "broken.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (root / "empty.mov").write_bytes(b"")
    small = np.stack([np.asarray(Image.fromarray(frame).resize((32, 18))) for frame in source_frames[:9]])
    write_video(root / "small.mkv", small, "libx264", "matroska")
    (root / "notes.txt").write_text("not a video")
    return root


def full_decode(path):
    """Every frame of a file, decoded front to back (the reference for the seeking reader)."""
    if path.suffix == ".webp":
        frames = []
        with Image.open(path) as image:
            for index in range(image.n_frames):
                image.seek(index)
                frames.append(np.asarray(image.convert("RGB")))
        return np.stack(frames)
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


@pytest.mark.matrix("Training", "dataset folder with unreadable files mixed in")
@pytest.mark.matrix("Video", "animated webp")
def test_scan_keeps_good_files_and_warns_about_exactly_the_bad_ones(folder, caplog):
    with caplog.at_level(logging.WARNING):
        dataset = VideoClipDataset(folder, clip_frames=9, crop_size=CROP)
    assert sorted(info.path.relative_to(folder).as_posix() for info in dataset.videos) == sorted(GOOD)
    assert sorted(path.name for path, _ in dataset.skipped) == sorted(BAD)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert all(name in warnings[0] for name in BAD)
    assert not any(name in warnings[0] for name in ("a.mp4", "b.mkv", "c.webm", "d.webp", "notes.txt"))
    reasons = {path.name: reason for path, reason in dataset.skipped}
    assert reasons["short.mp4"].startswith("too short") and reasons["small.mkv"].startswith("too small")
    assert reasons["broken.mp4"].startswith("unreadable") and reasons["empty.mov"].startswith("unreadable")


def test_probe_reads_frame_counts_and_sizes(folder):
    expected = {"sub/a.mp4": 30, "b.mkv": 20, "c.webm": 17, "d.webp": 12}
    for name, frames in expected.items():
        info = dataset_module.probe(folder / name)
        assert (info.frames, info.height, info.width) == (frames, HEIGHT, WIDTH), name


def test_clips_have_the_requested_shape_and_come_from_every_file(folder):
    dataset = VideoClipDataset(folder, clip_frames=9, crop_size=CROP, seed=0)
    for step in range(4):
        clip = dataset.sample(step)
        assert clip.shape == (9, *CROP, 3) and clip.dtype == torch.float32
        assert 0.0 <= clip.min() and clip.max() <= 1.0 and clip.std() > 0.01
    chosen = {dataset.locate(step).path.name for step in range(40)}
    assert chosen == {"a.mp4", "b.mkv", "c.webm", "d.webp"}


@pytest.mark.parametrize("name", GOOD)
def test_lazy_read_equals_the_same_frames_of_a_full_decode(folder, name):
    """Seeking and decoding only the clip gives exactly the frames (and crop) a front-to-back decode gives."""
    dataset = VideoClipDataset(folder, clip_frames=5, crop_size=CROP, frame_stride=2, seed=3)
    reference = full_decode(folder / name)
    step = next(step for step in range(200) if dataset.locate(step).path.name == name.split("/")[-1])
    where = dataset.locate(step)
    top, left, height, width = where.crop
    expected = reference[where.start:where.start + 9:2, top:top + height, left:left + width]
    np.testing.assert_array_equal((dataset.sample(step) * 255).round().byte().numpy(), expected)


def test_every_start_of_a_seekable_file_reads_exactly(folder):
    reference = full_decode(folder / "sub" / "a.mp4")
    crop = (0, 0, HEIGHT, WIDTH)
    for start in range(0, 22):
        frames = dataset_module.read_video_clip(folder / "sub" / "a.mp4", start, 9, 1, crop)
        np.testing.assert_array_equal(np.stack(frames), reference[start:start + 9])


def test_same_seed_and_step_give_the_same_clip_and_steps_differ(folder):
    first = VideoClipDataset(folder, clip_frames=9, crop_size=CROP, seed=5)
    second = VideoClipDataset(folder, clip_frames=9, crop_size=CROP, seed=5)
    assert torch.equal(first.sample(11), second.sample(11))
    locations = [first.locate(step) for step in range(12)]
    assert len({(where.path, where.start, where.crop) for where in locations}) == 12
    assert len({where.crop for where in locations}) >= 10  # crops, not only files, move from step to step
    other_seed = VideoClipDataset(folder, clip_frames=9, crop_size=CROP, seed=6)
    assert [other_seed.locate(step) for step in range(12)] != locations


def test_a_generator_drives_sampling_too(folder):
    dataset = VideoClipDataset(folder, clip_frames=9, crop_size=CROP)
    assert torch.equal(dataset.sample(np.random.default_rng(42)), dataset.sample(np.random.default_rng(42)))


def test_stride_raises_the_needed_length(folder):
    dataset = VideoClipDataset(folder, clip_frames=9, crop_size=32, frame_stride=2)
    assert sorted(info.path.name for info in dataset.videos) == ["a.mp4", "b.mkv", "c.webm"]  # 17 frames needed
    assert "d.webp" in {path.name for path, _ in dataset.skipped}
    assert dataset.sample(0).shape == (9, 32, 32, 3)


@pytest.mark.matrix("Training", "dataset with no usable clip")
def test_a_folder_without_usable_clips_says_what_is_needed(folder, tmp_path):
    for name in ("broken.mp4", "short.mp4"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    with pytest.raises(ValueError, match="none of its 2 video files is usable") as error:
        VideoClipDataset(tmp_path, clip_frames=9, crop_size=CROP)
    assert "at least 9 frames" in str(error.value) and "48x32" in str(error.value)


def test_empty_or_missing_folders_and_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no video files"):
        VideoClipDataset(tmp_path, clip_frames=9, crop_size=CROP)
    with pytest.raises(ValueError, match="does not exist"):
        VideoClipDataset(tmp_path / "missing", clip_frames=9, crop_size=CROP)
    with pytest.raises(ValueError, match="4n\\+1"):
        VideoClipDataset(tmp_path, clip_frames=8, crop_size=CROP)
