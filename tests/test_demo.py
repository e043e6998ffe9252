"""`make demo` as a user runs it: default arguments, real subprocess, fresh output path."""
import subprocess
import time
from fractions import Fraction

import av
import pytest

from conftest import REPO, make_env


def make(*args, timeout):
    return subprocess.run(["make", "--no-print-directory", "-C", str(REPO), *args], capture_output=True, text=True,
                          timeout=timeout, env=make_env())


@pytest.mark.timeout(1200)  # measured ~9-10 min on 2 CPU cores (VAE encode of 33 x 1280x720 dominates)
def test_make_demo_defaults(tmp_path):
    out = tmp_path / "demo.mp4"
    t0 = time.monotonic()
    r = make("demo", f"OUTPUT={out}", timeout=1150)
    took = time.monotonic() - t0
    print(f"make demo took {took:.0f} s")
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    assert "RANDOM-WEIGHT" in r.stdout.split("[demo]")[0], "stand-in notice missing before the run"
    assert "RANDOM-WEIGHT" in r.stdout.rsplit("[demo] wrote", 1)[1], "stand-in notice missing after the run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.mp4"]  # no temp leftovers
    with av.open(str(out)) as c:
        v = c.streams.video[0]
        assert (v.codec_context.width, v.codec_context.height) == (1280, 720)
        assert Fraction(v.average_rate) == 25
        assert sum(1 for _ in c.decode(v)) == 33
        assert len(c.streams.audio) == 1


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
