"""Streaming video files with PyAV: a lazy frame reader and an incremental, atomic writer that copies the audio.

Frames are float32 CPU tensors `[n, H, W, 3]` in 0..1 (ComfyUI's IMAGE layout). Neither side holds more than the
frames it is handed or asked for, so memory does not grow with the length of the video.
"""
import os
import uuid
import weakref
from collections import deque
from itertools import islice
from fractions import Fraction
from pathlib import Path

import av
import torch
from av.video.reformatter import ColorRange, Colorspace


# ffmpeg's AVCOL_* code for BT.709 primaries, transfer and matrix (the same number for all three).
BT709 = 1


def _open_input(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    try:
        return av.open(str(path))
    except av.error.FFmpegError as err:
        raise ValueError(f"not a video file: {path} ({err})") from err


def _frame_rate(stream):
    """The stream's average rate (frames / duration). For variable-frame-rate input this is the constant rate
    that keeps both the frame count and the duration: every decoded frame is kept, none duplicated or dropped."""
    rate = stream.average_rate or stream.guessed_rate
    if not rate:
        raise ValueError("the video stream has no frame rate")
    return Fraction(rate)


def count_frames(container, stream):
    """The header's frame count where the container records one (mp4, mov, avi); else the packets, demuxed
    without decoding (Matroska/WebM)."""
    return stream.frames or sum(1 for packet in container.demux(stream) if packet.size)


def _to_tensor(frame, width, height):
    rgb = frame.to_ndarray(format="rgb24", width=width, height=height)
    return torch.from_numpy(rgb).to(torch.float32) / 255.0


class VideoReader:
    """Metadata on construction; frames decoded lazily, in one sequential pass per iterator.

    Frame i is the i-th frame in presentation order. Variable-frame-rate input is read frame by frame (none
    dropped or duplicated) and `fps` is its average rate, so writing the frames back at `fps` keeps both the frame
    count and the duration; only the spacing of individual frames becomes even. Each iterator opens its own
    decoder, so iterators are independent and nothing stays open between them."""

    def __init__(self, path):
        self.path = Path(path)
        with _open_input(self.path) as container:
            if not container.streams.video:
                raise ValueError(f"no video stream in {self.path}")
            stream = container.streams.video[0]
            self.width = stream.codec_context.width
            self.height = stream.codec_context.height
            if not (self.width and self.height):  # e.g. animated WebP: ffmpeg finds the stream but cannot decode it
                raise ValueError(
                    f"{self.path}: ffmpeg cannot decode this {stream.codec_context.name} stream (no picture size)"
                    + (". Animated WebP is not a video ffmpeg reads: convert it to mp4, or load it with Load Image "
                       "and upscale the frames with the short-clip nodes (Encode LR Video, LiteVSR Sampler, Tiled "
                       "Decode)" if stream.codec_context.name == "webp" else ": convert it to mp4"))
            self.has_audio = bool(container.streams.audio)
            self.fps = _frame_rate(stream)
            self.frame_count = count_frames(container, stream)
        if self.frame_count == 0:
            raise ValueError(f"video has no frames: {self.path}")

    def _decoded_frames(self):
        with _open_input(self.path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            decoded = 0
            for frame in container.decode(stream):
                yield _to_tensor(frame, self.width, self.height)
                decoded += 1
                if decoded == self.frame_count:
                    return
        raise ValueError(f"{self.path}: decoded only {decoded} of {self.frame_count} frames (damaged file?)")

    def ranges(self, spans):
        """Yields frames [start, stop) for each (start, stop) in `spans` from ONE sequential decode.

        Starts must not decrease (spans may overlap); only frames that the current span still needs are held."""
        decoded = self._decoded_frames()
        window, next_index, previous_start = deque(), 0, 0  # window: frames next_index - len(window) .. next_index - 1
        for start, stop in spans:
            stop = min(stop, self.frame_count)
            if not previous_start <= start < stop:
                raise ValueError(f"span ({start}, {stop}) is empty, past the end or before an earlier span")
            previous_start = start
            while window and next_index - len(window) < start:
                window.popleft()
            while next_index < stop:
                frame = next(decoded)
                if next_index >= start:  # frames between spans are decoded and dropped
                    window.append(frame)
                next_index += 1
            yield torch.stack(list(islice(window, stop - start)))

    def chunks(self, size, overlap=0):
        """Consecutive chunks of `size` frames, each starting `overlap` frames before the previous one ends;
        the last one may be shorter. Together they cover every frame."""
        if not 0 <= overlap < size:
            raise ValueError(f"need 0 <= overlap < size, got size {size}, overlap {overlap}")
        starts = range(0, max(self.frame_count - overlap, 1), size - overlap)
        return self.ranges((start, start + size) for start in starts)

    def frames(self, start, count):
        """Frames [start, start + count) as one tensor. Decodes from the beginning: use `ranges` or `chunks`
        to walk a whole video."""
        return next(self.ranges([(start, start + count)]))


def _pixel_format(codec_name, width, height):
    """yuv420p wherever it can be used: every player decodes it. 4:2:0 halves chroma in both directions and
    H.264/HEVC can only crop the coded picture in 2-pixel steps in 4:2:0, so an odd width or height cannot be
    stored exactly; those get yuv444p (exact size; High 4:4:4 profile, which fewer hardware players decode)."""
    supported = {fmt.name for fmt in av.codec.Codec(codec_name, "w").video_formats or ()}
    wanted = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
    if wanted not in supported:
        raise ValueError(f"codec {codec_name} cannot encode {width}x{height} as {wanted}")
    return wanted


def _packet_time(packet):
    stamp = packet.pts if packet.pts is not None else packet.dts
    return None if stamp is None else stamp * packet.time_base


class _AudioCopy:
    """Copies every audio stream of a source file into an output container packet by packet (no re-encode),
    on the source's timeline shifted so that the source's first video frame lands at time 0."""

    def __init__(self, source, output):
        self._input = _open_input(source)
        streams = list(self._input.streams.audio)
        try:
            for stream in streams:
                codec = stream.codec_context.codec.canonical_name
                if codec not in output.supported_codecs:
                    raise ValueError(f"audio codec {codec} cannot be copied into {output.format.name}; "
                                     "write a .mkv instead")
            self._outputs = {stream.index: output.add_stream_from_template(stream) for stream in streams}
        except BaseException:
            self._input.close()
            raise
        self._output = output
        video = self._input.streams.video
        self._start = video[0].start_time * video[0].time_base if video and video[0].start_time else 0
        self._packets = self._input.demux(*streams) if streams else iter(())
        self._pending = None

    def _next_packet(self):
        """(packet, time on the output timeline), skipping the demuxer's empty flush packets; None at the end."""
        for packet in self._packets:
            time = _packet_time(packet)
            if packet.size and time is not None:
                return packet, time - self._start
        return None

    def _mux(self, packet):
        shift = round(self._start / packet.time_base)
        packet.pts = None if packet.pts is None else packet.pts - shift
        packet.dts = None if packet.dts is None else packet.dts - shift
        packet.stream = self._outputs[packet.stream.index]
        self._output.mux(packet)

    def _take(self):
        """The packet put back by copy_until, else the next one."""
        item, self._pending = self._pending or self._next_packet(), None
        return item

    def copy_until(self, time):
        """Copies packets in file order up to the first one that starts at or after `time` (seconds)."""
        while True:
            item = self._take()
            if item is None:
                return
            if item[1] >= time:
                self._pending = item
                return
            self._mux(item[0])

    def finish(self, end):
        """Copies what starts before `end` (the video's duration) in every stream, so audio ends within one
        audio frame of the video."""
        finished = set()
        while len(finished) < len(self._outputs):
            item = self._take()
            if item is None:
                break
            if item[1] >= end:
                finished.add(item[0].stream.index)
            else:
                self._mux(item[0])
        self.close()

    def close(self):
        self._input.close()


def _discard(container, audio, temporary):
    """Closes everything and deletes the temporary file; used by abort() and when a writer is dropped unclosed."""
    for closable in (audio, container):
        try:
            if closable is not None:
                closable.close()
        except Exception:  # the file is being thrown away; its trailer may fail to write
            pass
    Path(temporary).unlink(missing_ok=True)


class VideoWriter:
    """Encodes frames as they come into a temporary file beside `path`, renamed to `path` by a successful close().

    abort(), an exception (KeyboardInterrupt and ComfyUI's interrupt included) leaving a `with` block, or dropping
    an unclosed writer deletes the temporary file, so a failed run leaves nothing behind. Colour is written as
    BT.709, limited range, and tagged so; frames are numbered at a constant `fps` (a Fraction, e.g. 30000/1001)."""

    def __init__(self, path, fps, width, height, audio_from=None, codec="libx264", crf=18, preset="medium"):
        self.path = Path(path)
        # an exact rate (int, Fraction) is kept; a float is snapped to the NTSC-style fraction it stands for
        self.fps = Fraction(fps) if isinstance(fps, (int, Fraction)) else Fraction(fps).limit_denominator(1001)
        self.width, self.height = width, height
        self.frames_written = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # the final suffix stays last so ffmpeg picks the same container format
        self._temporary = self.path.with_name(f".{self.path.stem}.{uuid.uuid4().hex[:8]}.partial{self.path.suffix}")
        self._container = av.open(str(self._temporary), "w")
        try:
            self._stream = self._add_video_stream(codec, crf, preset)
            self._audio = _AudioCopy(audio_from, self._container) if audio_from is not None else None
        except BaseException:
            _discard(self._container, None, self._temporary)
            raise
        self._cleanup = weakref.finalize(self, _discard, self._container, self._audio, self._temporary)

    def _add_video_stream(self, codec, crf, preset):
        if av.codec.Codec(codec, "w").canonical_name not in self._container.supported_codecs:
            raise ValueError(f"{codec} video cannot be stored in {self.path.suffix or 'this container'}")
        stream = self._container.add_stream(codec, rate=self.fps)
        stream.width, stream.height = self.width, self.height
        stream.pix_fmt = _pixel_format(codec, self.width, self.height)
        stream.codec_context.time_base = 1 / self.fps
        stream.codec_context.color_primaries = BT709
        stream.codec_context.color_trc = BT709
        stream.codec_context.colorspace = BT709
        stream.codec_context.color_range = ColorRange.MPEG
        stream.options = {"crf": str(crf), "preset": preset}
        return stream

    def write(self, frames):
        """Encodes `frames` ([n, height, width, 3], float 0..1) after those already written."""
        if not self._cleanup.alive:
            raise ValueError(f"the writer for {self.path} is already closed or aborted")
        if frames.ndim != 4 or tuple(frames.shape[1:]) != (self.height, self.width, 3):
            raise ValueError(f"expected frames [n, {self.height}, {self.width}, 3], got {list(frames.shape)}")
        rgb = (frames.detach().to("cpu", torch.float32).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        for image in rgb:
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(
                format=self._stream.pix_fmt, dst_colorspace=Colorspace.ITU709, dst_color_range=ColorRange.MPEG)
            frame.pts = self.frames_written
            self._container.mux(self._stream.encode(frame))
            self.frames_written += 1
        if self._audio is not None:  # interleave: audio up to the video written so far
            self._audio.copy_until(self.frames_written / self.fps)

    def close(self):
        """Finishes the file and renames it to `path`. Any failure deletes it instead, and is raised."""
        if not self._cleanup.alive:
            return
        try:
            if self.frames_written == 0:
                raise ValueError(f"no frames were written to {self.path}")
            self._container.mux(self._stream.encode(None))
            if self._audio is not None:
                self._audio.finish(self.frames_written / self.fps)
            self._container.close()
            os.replace(self._temporary, self.path)
            self._cleanup.detach()
        except BaseException:
            self.abort()
            raise

    def abort(self):
        """Stops writing and deletes the unfinished file; nothing appears under `path`."""
        self._cleanup()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, traceback):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False

