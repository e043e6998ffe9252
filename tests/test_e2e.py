"""End to end on a real headless ComfyUI: the example upscale graph and its tiny-decoder variant on a real clip with
audio, and bad inputs."""
from pathlib import Path

import av
import pytest

from tools import comfy_server
from tools import demo as demo_tool
from conftest import SERVED_TINY_DECODERS, TEST_CLIP, TEST_CLIP_FRAMES, TEST_CLIP_SIZE
from helpers import assert_upscaled_copy
from workflows import EXAMPLES, load

SCALE = 2
TINY_DECODER_EXAMPLE = EXAMPLES / "api" / "litevsr_upscale_tiny_decoder_api.json"
HUNYUAN_SCALING_UNDONE = "loaded as HunyuanVideo's taehv"  # nodes/decoders.py's log line for an fp16 taew2_1


def log_during(comfy, run):
    """What the server logged while `run()` ran, and what `run()` returned."""
    start = comfy.log_path.stat().st_size
    result = run()
    with open(comfy.log_path, "rb") as log:
        log.seek(start)
        return log.read().decode(errors="replace"), result


def test_example_upscales_clip_with_audio(comfy, test_clip):
    prompt = demo_tool.configure(demo_tool.load_api_workflow(), input_name=TEST_CLIP, scale=SCALE, steps=1,
                                 adapter=demo_tool.NEW_ADAPTER, filename_prefix="e2e/upscaled")
    paths = comfy.run_prompt(prompt, timeout=300)
    assert len(paths) == 1 and paths[0].is_file(), paths
    src, _ = assert_upscaled_copy(paths[0], test_clip, SCALE)
    assert src["frames"] == TEST_CLIP_FRAMES and src["size"] == TEST_CLIP_SIZE


@pytest.mark.parametrize("decoder", SERVED_TINY_DECODERS)
def test_tiny_decoder_example_upscales_clip_with_audio(comfy, test_clip, decoder):
    """The tiny-decoder example: the stock Load VAE loads a tiny Wan decoder by its exact file name (lighttaew2_1
    from models/vae_approx as the example has it; taew2_1, fp16, from models/vae), and Tiled Decode decodes with it
    while the Wan VAE encodes. Exactly N frames at scale x H x W come out, with the audio."""
    prompt = demo_tool.configure(load(TINY_DECODER_EXAMPLE), input_name=TEST_CLIP, scale=SCALE, steps=1,
                                 adapter=demo_tool.NEW_ADAPTER, filename_prefix=f"e2e/{Path(decoder).stem}")
    (decode,) = [n for n in prompt.values() if n["class_type"] == "LiteVSRTiledDecode"]
    (encode,) = [n for n in prompt.values() if n["class_type"] == "LiteVSREncodeVideo"]
    decoder_loader, encoder_loader = prompt[decode["inputs"]["vae"][0]], prompt[encode["inputs"]["vae"][0]]
    assert decoder_loader["class_type"] == encoder_loader["class_type"] == "VAELoader"
    assert decoder_loader["inputs"] == {"vae_name": demo_tool.TINY_DECODER_NAME}
    assert encoder_loader["inputs"] == {"vae_name": demo_tool.VAE_NAME}
    decoder_loader["inputs"]["vae_name"] = decoder
    log, paths = log_during(comfy, lambda: comfy.run_prompt(prompt, timeout=300))
    assert len(paths) == 1 and paths[0].is_file(), paths
    src, _ = assert_upscaled_copy(paths[0], test_clip, SCALE)
    assert src["frames"] == TEST_CLIP_FRAMES and src["size"] == TEST_CLIP_SIZE
    # only the fp16 file is taken for HunyuanVideo's taehv, and its latent scaling is undone for each decode
    assert (HUNYUAN_SCALING_UNDONE in log) == (decoder == "taew2_1.safetensors"), log[-3000:]


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
