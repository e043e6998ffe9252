"""End to end on a real headless ComfyUI: the example upscale graph on a real clip with audio, and bad inputs."""
import av
import pytest

from tools import comfy_server
from tools import demo as demo_tool
from conftest import TEST_CLIP, TEST_CLIP_FRAMES, TEST_CLIP_SIZE
from helpers import probe

SCALE = 2


def test_example_upscales_clip_with_audio(comfy, test_clip):
    prompt = demo_tool.configure(demo_tool.load_api_workflow(), input_name=TEST_CLIP, scale=SCALE, steps=1,
                                 adapter=demo_tool.NEW_ADAPTER, filename_prefix="e2e/upscaled")
    paths = comfy.run_prompt(prompt, timeout=300)
    assert len(paths) == 1 and paths[0].is_file(), paths
    src, out = probe(test_clip), probe(paths[0])
    assert src["frames"] == TEST_CLIP_FRAMES
    assert out["frames"] == src["frames"]
    assert out["fps"] == src["fps"]
    assert out["size"] == (SCALE * TEST_CLIP_SIZE[0], SCALE * TEST_CLIP_SIZE[1])
    assert out["audio"] == 1


def test_missing_input_file_is_rejected(comfy):
    prompt = demo_tool.configure(demo_tool.load_api_workflow(), input_name="no_such_clip.mp4", scale=SCALE)
    with pytest.raises(comfy_server.ComfyError) as err:
        comfy.run_prompt(prompt, timeout=60)
    msg = str(err.value)
    assert "\n" not in msg
    assert "LoadVideo" in msg and "no_such_clip.mp4" in msg, msg


@pytest.mark.matrix("Video", "zero frames")
def test_zero_frame_clip_fails_clearly(comfy):
    """A container without a single video frame: the run fails with a one-line error naming the node, writes no
    video, and the server keeps working."""
    name = "zero_frames.mp4"
    with av.open(str(comfy.base / "input" / name), "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 64, 36, "yuv420p"
        c.start_encoding()
    before = set((comfy.base / "output").rglob("*.mp4"))
    prompt = demo_tool.configure(demo_tool.load_api_workflow(), input_name=name, scale=SCALE,
                                 filename_prefix="e2e/zero")
    with pytest.raises(comfy_server.ComfyError) as err:
        comfy.run_prompt(prompt, timeout=120)
    msg = str(err.value)
    assert "\n" not in msg and "failed" in msg and "node " in msg, msg
    assert set((comfy.base / "output").rglob("*.mp4")) == before
    assert comfy.get("/system_stats")["system"]
