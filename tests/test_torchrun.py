"""tools/upscale.py under `torchrun --nproc_per_node=2` (gloo, CPU, real processes) writes the same video as one
process with the same --segment-chunks, and leaves nothing in the exchange folder."""
import subprocess
import sys

import av
import numpy as np
import pytest

from tools import demo as demo_tool
from conftest import REPO

UPSCALE = ["-m", "tools.upscale"]
FRAMES, WIDTH, HEIGHT = 41, 64, 36  # x2 -> 128 px wide: a multiple of 8 macroblocks (see nodes/core/degrade.py)
SETTINGS = ["--stand-ins", "--scale", "2", "--steps", "1", "--seed", "3", "--chunk-frames", "9",
            "--overlap-frames", "4", "--segment-chunks", "2"]  # 9 chunks, 5 segments: ranks take 4 and 5 chunks


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("torchrun_clip") / "bbb_41.mp4"
    return demo_tool.make_clip(demo_tool.bigbuckbunny(), path, FRAMES, WIDTH, HEIGHT)


def run(command, log):
    done = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)
    log.write_text(done.stdout)
    assert done.returncode == 0, f"{' '.join(map(str, command))} failed:\n{done.stdout[-4000:]}"
    digests = [line.split()[-1] for line in done.stdout.splitlines() if "frames sha256" in line]
    assert len(digests) == 1, done.stdout[-4000:]  # printed once, by rank 0
    return digests[0]


def decoded(path):
    """Frames (uint8 RGB), frame rate, and each audio stream's codec, rate and packets."""
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        rate = video.average_rate
        frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video)])
    with av.open(str(path)) as container:
        audio = [(s.codec_context.name, s.codec_context.sample_rate) for s in container.streams.audio]
        packets = [(p.pts, bytes(p)) for p in container.demux(*container.streams.audio) if p.size]
    return frames, rate, audio, packets


@pytest.mark.slow
def test_torchrun_two_processes_write_what_one_process_writes(tmp_path, clip):
    single_out, shared_out, exchange = tmp_path / "one" / "out.mp4", tmp_path / "two" / "out.mp4", tmp_path / "xchg"
    single = run([sys.executable, *UPSCALE, "--input", clip, "--output", single_out, *SETTINGS], tmp_path / "one.log")
    shared = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *UPSCALE,
                  "--input", clip, "--output", shared_out, "--exchange", exchange, *SETTINGS], tmp_path / "two.log")
    assert "rank 1/2] chunks 4..8 of 9" in (tmp_path / "two.log").read_text()  # both ranks really worked

    assert shared == single  # the frames handed to the encoder
    frames_1, rate_1, audio_1, packets_1 = decoded(single_out)
    frames_2, rate_2, audio_2, packets_2 = decoded(shared_out)
    assert frames_1.shape == frames_2.shape == (FRAMES, 2 * HEIGHT, 2 * WIDTH, 3)
    assert np.array_equal(frames_1, frames_2)  # the decoded files
    with av.open(str(clip)) as source:
        assert rate_1 == rate_2 == source.streams.video[0].average_rate
        assert audio_1 == audio_2 == [(s.codec_context.name, s.codec_context.sample_rate)
                                      for s in source.streams.audio]
    assert packets_1 and packets_1 == packets_2

    assert exchange.is_dir() and not list(exchange.iterdir())  # every handed-over chunk was taken and deleted
    assert [p.name for p in shared_out.parent.iterdir()] == ["out.mp4"]  # no temporary or partial file left
    assert [p.name for p in single_out.parent.iterdir()] == ["out.mp4"]
