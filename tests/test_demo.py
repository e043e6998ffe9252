"""`make demo` as a user runs it: default arguments, real subprocess, fresh output path."""
import subprocess
import time
from fractions import Fraction

import av
import pytest

from conftest import REPO, make_env
from tools import demo as demo_tool


def make(*args, timeout):
    return subprocess.run(["make", "--no-print-directory", "-C", str(REPO), *args], capture_output=True, text=True,
                          timeout=timeout, env=make_env())


QUICK_SAMPLE = "9x160x90"  # the default input's path at 1/15 of the pixels: same contract, ~1 min instead of ~9


@pytest.mark.parametrize("model", [demo_tool.LITEVSR, demo_tool.INFVSR])
def test_make_demo_defaults(tmp_path, model):
    """Every default but the size of the sample clip (and the model kind): the clip is cut from bigbuckbunny with its
    audio, upscaled x4 on the stand-ins (in one step by a new adapter; or on InfVSR's causal stream with its
    reference encoder) through the kind's example, saved with exactly its frames, size, rate and audio."""
    out = tmp_path / "demo.mp4"
    t0 = time.monotonic()
    r = make("demo", f"OUTPUT={out}", f"SAMPLE={QUICK_SAMPLE}", f"MODEL={model}", timeout=900)
    took = time.monotonic() - t0
    print(f"make demo MODEL={model} took {took:.0f} s")
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    assert f"running {demo_tool.api_workflow_path(model=model).name}" in r.stdout
    assert "RANDOM-WEIGHT" in r.stdout.split("[demo]")[0], "stand-in notice missing before the run"
    assert "RANDOM-WEIGHT" in r.stdout.rsplit("[demo] wrote", 1)[1], "stand-in notice missing after the run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.mp4"]  # no temp leftovers
    frames, width, height = demo_tool.sample_shape(QUICK_SAMPLE)
    with av.open(str(out)) as c:
        v = c.streams.video[0]
        assert (v.codec_context.width, v.codec_context.height) == (4 * width, 4 * height)
        assert Fraction(v.average_rate) == 25
        assert sum(1 for _ in c.decode(v)) == frames
        assert len(c.streams.audio) == 1


def test_default_sample_is_the_clip_the_examples_name():
    """The full-size default input is what the examples' LoadVideo node names (bigbuckbunny_WxH.mp4); its shape is
    parsed by the same function the quick test above goes through."""
    frames, width, height = demo_tool.sample_shape(demo_tool.SAMPLE_SHAPE)
    assert demo_tool.SAMPLE_CLIP == f"bigbuckbunny_{width}x{height}.mp4" and frames % 4 == 1
    with pytest.raises(ValueError, match="FRAMESxWIDTHxHEIGHT"):
        demo_tool.sample_shape("320x180")


def test_make_demo_bad_input_fails_in_one_line(tmp_path):
    out = tmp_path / "demo.mp4"
    r = make("demo", f"OUTPUT={out}", f"INPUT={tmp_path / 'missing.mp4'}", timeout=300)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.startswith("demo failed:")]
    assert len(lines) == 1 and "missing.mp4" in lines[0], r.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("kind", [
    pytest.param("zero_frames", marks=pytest.mark.matrix("Video", "zero frames")),
    pytest.param("not_a_video", marks=pytest.mark.matrix("Video", "a file that is not a video"))])
def test_make_demo_refuses_unusable_input_in_one_line(tmp_path, kind):
    import av

    source = tmp_path / f"{kind}.mp4"
    if kind == "zero_frames":
        with av.open(str(source), "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=25)
            stream.width, stream.height, stream.pix_fmt = 64, 36, "yuv420p"
            container.start_encoding()
    else:
        source.write_text("this is not a video")
    out = tmp_path / "out" / "demo.mp4"
    r = make("demo", f"OUTPUT={out}", f"INPUT={source}", timeout=300)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.startswith("demo failed:")]
    expected = "has no video frames" if kind == "zero_frames" else "not a video"
    assert len(lines) == 1 and expected in lines[0], r.stderr
    assert not out.exists()
