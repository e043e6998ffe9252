"""Lazy reader against PyAV's own decode, writer round trips (odd sizes, fractional fps, audio remux), atomic
finish, and clear errors. Everything on real files: bigbuckbunny and clips written here."""
from fractions import Fraction

import av
from tools import demo
import numpy as np
import pytest
import torch

from comfyui_litevsr.nodes.core.video_io import VideoReader, VideoWriter

CLIP_FRAMES, CLIP_WIDTH, CLIP_HEIGHT = 20, 177, 97  # odd on purpose: yuv420p cannot hold it


class InterruptProcessingException(Exception):
    """Stands in for ComfyUI's interrupt (a plain Exception subclass in comfy.model_management)."""


@pytest.fixture(scope="module")
def bunny():
    return demo.bigbuckbunny()


@pytest.fixture(scope="module")
def clip(bunny, tmp_path_factory):
    return demo.make_clip(bunny, tmp_path_factory.mktemp("clip") / "clip.mp4", CLIP_FRAMES, CLIP_WIDTH, CLIP_HEIGHT)


def pyav_frames(path):
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            yield torch.from_numpy(frame.to_ndarray(format="rgb24")).to(torch.float32) / 255


def audio_durations(path):
    """Seconds of decoded sound per audio stream (the decoder drops the encoder's priming samples)."""
    durations = []
    with av.open(str(path)) as container:
        for stream in container.streams.audio:
            samples = sum(frame.samples for frame in container.decode(stream))
            durations.append(samples / stream.codec_context.sample_rate)
            container.seek(0)
    return durations


def encode_tone(container, stream, seconds, pitch=220):
    """A `seconds` long tone into an audio `stream` added to `container` before anything was muxed."""
    rate, layout = stream.codec_context.sample_rate, stream.codec_context.layout
    tone = np.sin(np.arange(int(seconds * rate)) / rate * 2 * np.pi * pitch)
    planar = np.repeat(tone[None], len(layout.channels), axis=0)
    if stream.codec_context.name == "aac":
        frame = av.AudioFrame.from_ndarray(planar.astype(np.float32), format="fltp", layout=layout.name)
    else:  # the PCM codecs take interleaved 16-bit samples
        frame = av.AudioFrame.from_ndarray((planar.T.reshape(1, -1) * 30000).astype(np.int16), format="s16",
                                           layout=layout.name)
    frame.sample_rate, frame.pts = rate, 0
    container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def make_source(path, frames, audio_layouts, fps=25, size=(64, 36)):
    """A video of `frames` frames with one audio stream (a tone) per layout, written directly with PyAV."""
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = *size, "yuv420p"
        audios = [container.add_stream("aac", rate=48000, layout=layout) for layout in audio_layouts]
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((size[1], size[0], 3), index * 10 % 256, np.uint8), "rgb24")
            frame.pts = index
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        for number, audio in enumerate(audios, start=1):
            encode_tone(container, audio, frames / fps, pitch=220 * number)
    return path


def make_audio_only(path, codec="aac"):
    with av.open(str(path), "w") as container:
        encode_tone(container, container.add_stream(codec, rate=48000, layout="mono"), 0.1)
    return path


# --- reader ---------------------------------------------------------------------------------------------------------

def test_reader_metadata_of_a_real_clip(bunny):
    reader = VideoReader(bunny)
    assert (reader.frame_count, reader.width, reader.height, reader.has_audio) == (132, 1280, 720, True)
    assert reader.fps == Fraction(25) and isinstance(reader.fps, Fraction)


def test_lazy_chunks_equal_pyavs_full_decode_frame_for_frame(bunny):
    reader = VideoReader(bunny)
    reference = pyav_frames(bunny)
    size, overlap, covered = 16, 3, 0
    for index, chunk in enumerate(reader.chunks(size, overlap)):
        assert chunk.dtype == torch.float32 and chunk.shape[1:] == (720, 1280, 3)
        fresh = chunk if index == 0 else chunk[overlap:]  # the overlap repeats the previous chunk's tail
        for frame in fresh:
            assert torch.equal(frame, next(reference))
        covered += len(fresh)
    assert covered == 132
    assert next(reference, None) is None


@pytest.mark.parametrize("size, overlap", [(4, 1), (5, 0), (20, 0), (30, 7), (7, 6)])
def test_chunks_cover_every_frame_in_order(clip, size, overlap):
    reader = VideoReader(clip)
    whole = reader.frames(0, CLIP_FRAMES)
    chunks = list(reader.chunks(size, overlap))
    starts = range(0, CLIP_FRAMES, size - overlap)[: len(chunks)]
    for start, chunk in zip(starts, chunks):
        assert torch.equal(chunk, whole[start:start + size])
    assert starts[-1] + len(chunks[-1]) == CLIP_FRAMES
    assert all(len(chunk) == size for chunk in chunks[:-1])
    assert len(chunks) == 1 or len(chunks[-1]) > overlap  # no chunk that only repeats the previous one


def test_ranges_skip_gaps_and_repeat_overlaps_from_one_decode(clip):
    reader = VideoReader(clip)
    whole = reader.frames(0, CLIP_FRAMES)
    spans = [(0, 5), (3, 9), (12, 13), (12, 18), (17, 40)]
    for (start, stop), frames in zip(spans, reader.ranges(spans)):
        assert torch.equal(frames, whole[start:min(stop, CLIP_FRAMES)])
    assert torch.equal(reader.frames(7, 3), whole[7:10])
    with pytest.raises(ValueError, match="before an earlier span"):
        list(reader.ranges([(5, 8), (4, 8)]))


def test_frame_count_is_counted_when_the_container_does_not_record_it(clip, tmp_path):
    mkv = tmp_path / "clip.mkv"
    with VideoWriter(mkv, 25, 64, 36) as writer:
        writer.write(torch.rand(11, 36, 64, 3))
    with av.open(str(mkv)) as container:
        assert container.streams.video[0].frames == 0  # Matroska keeps no count
    assert VideoReader(mkv).frame_count == 11
    assert sum(len(chunk) for chunk in VideoReader(mkv).chunks(4)) == 11


# --- writer ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fps", [Fraction(25), Fraction(30000, 1001)])
@pytest.mark.matrix("Video", "odd sizes (177x97)")
def test_round_trip_keeps_count_odd_size_fps_and_audio(bunny, tmp_path, fps):
    frames = VideoReader(bunny).frames(0, CLIP_FRAMES)[:, 200:200 + CLIP_HEIGHT, 300:300 + CLIP_WIDTH]
    out = tmp_path / "out.mp4"
    with VideoWriter(out, fps, CLIP_WIDTH, CLIP_HEIGHT, audio_from=bunny) as writer:
        writer.write(frames[:7])  # in pieces, as a streaming caller does
        writer.write(frames[7:])
    reader = VideoReader(out)
    assert (reader.frame_count, reader.width, reader.height, reader.fps) == (CLIP_FRAMES, CLIP_WIDTH, CLIP_HEIGHT, fps)
    decoded = reader.frames(0, CLIP_FRAMES)
    assert decoded.shape == frames.shape
    assert (decoded - frames).abs().mean() < 2 / 255  # colours survive (same matrix written as read)
    assert reader.has_audio
    (audio_seconds,) = audio_durations(out)
    assert abs(audio_seconds - CLIP_FRAMES / fps) <= 1024 / 48000  # one AAC frame
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out.mp4"]


def test_even_sizes_use_yuv420p_and_odd_sizes_yuv444p(clip, tmp_path):
    with VideoWriter(tmp_path / "even.mp4", 25, 64, 36) as writer:
        writer.write(torch.rand(3, 36, 64, 3))
    for path, expected in ((tmp_path / "even.mp4", "yuv420p"), (clip, "yuv444p")):
        with av.open(str(path)) as container:
            assert container.streams.video[0].codec_context.pix_fmt == expected


def test_test_clip_has_the_requested_frames_size_and_trimmed_audio(clip):
    reader = VideoReader(clip)
    assert (reader.frame_count, reader.width, reader.height, reader.fps) == (CLIP_FRAMES, CLIP_WIDTH, CLIP_HEIGHT, 25)
    (audio_seconds,) = audio_durations(clip)
    assert abs(audio_seconds - CLIP_FRAMES / 25) <= 1024 / 48000


@pytest.mark.matrix("Video", "two audio streams")
def test_every_audio_stream_is_copied_without_reencoding(tmp_path):
    source = make_source(tmp_path / "two_tracks.mp4", 25, ["mono", "stereo"])
    out = tmp_path / "out.mp4"
    with VideoWriter(out, 25, 64, 36, audio_from=source) as writer:
        for chunk in VideoReader(source).chunks(8):
            writer.write(chunk)
    with av.open(str(source)) as original, av.open(str(out)) as copy:
        assert [s.codec_context.channels for s in copy.streams.audio] == [1, 2]
        for before, after in zip(original.streams.audio, copy.streams.audio):
            first_before = next(p for p in original.demux(before) if p.size)
            first_after = next(p for p in copy.demux(after) if p.size)
            assert bytes(first_before) == bytes(first_after)  # the same compressed bytes: copied, not re-encoded
    for seconds in audio_durations(out):
        assert abs(seconds - 1.0) <= 1024 / 48000


@pytest.mark.matrix("Video", "no audio")
def test_no_audio_in_gives_no_audio_out(tmp_path, clip):
    silent = make_source(tmp_path / "silent.mp4", 5, [])
    assert not VideoReader(silent).has_audio
    for audio_from in (None, silent):
        out = tmp_path / f"out_{audio_from is None}.mp4"
        with VideoWriter(out, 25, 64, 36, audio_from=audio_from) as writer:
            writer.write(torch.rand(5, 36, 64, 3))
        with av.open(str(out)) as container:
            assert len(container.streams.audio) == 0 and container.streams.video[0].frames == 5


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt, InterruptProcessingException])
@pytest.mark.matrix("Runs", "interrupt during streaming encode")
def test_interrupted_writer_leaves_nothing_behind(bunny, tmp_path, error):
    out = tmp_path / "out.mp4"
    with pytest.raises(error):
        with VideoWriter(out, 25, 64, 36, audio_from=bunny) as writer:
            writer.write(torch.rand(9, 36, 64, 3))
            assert any(tmp_path.iterdir())  # the partial file exists while writing...
            raise error("stop")
    assert list(tmp_path.iterdir()) == []  # ...and neither it nor the final name survives


def test_dropped_or_empty_writers_leave_nothing_behind(tmp_path):
    writer = VideoWriter(tmp_path / "dropped.mp4", 25, 64, 36)
    writer.write(torch.rand(2, 36, 64, 3))
    del writer  # never closed: the finaliser removes the partial file
    with pytest.raises(ValueError, match="no frames were written"):
        VideoWriter(tmp_path / "empty.mp4", 25, 64, 36).close()
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_wrong_frames_and_uncopyable_audio(tmp_path):
    with VideoWriter(tmp_path / "out.mp4", 25, 64, 36) as writer:
        with pytest.raises(ValueError, match=r"expected frames \[n, 36, 64, 3\]"):
            writer.write(torch.rand(2, 64, 36, 3))
        writer.write(torch.rand(1, 36, 64, 3))
    with pytest.raises(ValueError, match="already closed"):
        writer.write(torch.rand(1, 36, 64, 3))
    mulaw = make_audio_only(tmp_path / "mulaw.wav", "pcm_mulaw")  # audio may come from any file
    with pytest.raises(ValueError, match="pcm_mulaw cannot be copied into mp4.*mkv"):
        VideoWriter(tmp_path / "refused.mp4", 25, 64, 36, audio_from=mulaw)
    with pytest.raises(FileNotFoundError, match="input file not found"):
        VideoWriter(tmp_path / "refused.mp4", 25, 64, 36, audio_from=tmp_path / "missing.mp4")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mulaw.wav", "out.mp4"]


# --- errors ---------------------------------------------------------------------------------------------------------

def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.mp4"
    with pytest.raises(FileNotFoundError, match=f"input file not found: {missing}"):
        VideoReader(missing)


@pytest.mark.matrix("Video", "a file that is not a video")
def test_not_a_video(tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("certainly not a video")
    with pytest.raises(ValueError, match="not a video file"):
        VideoReader(text)
    audio_only = make_audio_only(tmp_path / "tone.m4a")
    with pytest.raises(ValueError, match="no video stream"):
        VideoReader(audio_only)


@pytest.mark.matrix("Video", "zero frames")
def test_zero_frame_video(tmp_path):
    empty = tmp_path / "empty.mkv"
    with av.open(str(empty), "w") as container:  # a declared video stream that never gets a packet
        video = container.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = 64, 36, "yuv420p"
        audio = container.add_stream("aac", rate=48000, layout="mono")
        encode_tone(container, audio, 0.1)
    with pytest.raises(ValueError, match="video has no frames"):
        VideoReader(empty)
