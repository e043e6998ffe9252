"""What several tests use and the pack does not: a video file's facts, short chunk lists stitched at once, ETA text."""
from fractions import Fraction

import av
import torch

from comfyui_litevsr.nodes.core.temporal import Stitcher


def probe(path):
    """Decoded frame count, frame rate, (width, height) and the number of audio streams of a video file."""
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        return {"frames": sum(1 for _ in container.decode(video)), "fps": Fraction(video.average_rate),
                "size": (video.codec_context.width, video.codec_context.height),
                "audio": len(container.streams.audio)}


def assert_upscaled_copy(out_path, src_path, scale):
    """The output file has exactly the source's frames and frame rate, `scale` x its width and height, and its
    audio stream (the source has one). Returns both probes."""
    src, out = probe(src_path), probe(out_path)
    assert src["audio"] == 1, f"{src_path} has no audio to keep"
    assert out["frames"] == src["frames"]
    assert out["fps"] == src["fps"]
    assert out["size"] == (scale * src["size"][0], scale * src["size"][1])
    assert out["audio"] == 1
    return src, out


def stitch(outputs, chunks):
    """All chunk outputs stitched into one tensor (for short clips; the pack streams with Stitcher)."""
    stitcher = Stitcher(chunks)
    return torch.cat([stitcher.push(output) for output in outputs])


def format_eta(seconds):
    """1:24, 1:02:03; '?' when unknown."""
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
