"""End to end on a real headless ComfyUI: the long-video example (the streaming node, file to file) on real clips
with audio, its atomic output, a tiny decoder on its `decoder` input, and an interrupt in the middle of a run; the
InfVSR example (the same node on InfVSR's causal stream) with and without its reference encoder."""
import subprocess
import time
from pathlib import Path

import pytest

from tools import comfy_server
from tools import demo as demo_tool
from conftest import REPO, TEST_CLIP, TEST_CLIP_FRAMES, TEST_CLIP_SIZE, make_env
from helpers import assert_upscaled_copy, probe
from comfyui_litevsr.nodes.core.video_io import VideoReader

SCALE = 2
CHUNK, OVERLAP = 9, 4  # 29 frames -> 6 chunks; 61 frames -> 14 chunks
CLIP, CLIP_FRAMES = "litevsr_stream_clip.mp4", 29
INFVSR_CHUNKS = 3  # InfVSR's causal chunks of the 29 frames: 9, 12, 8
LONG_CLIP, LONG_FRAMES, LONG_CHUNKS = "litevsr_stream_long.mp4", 61, 14
NODE = "LiteVSRUpscaleVideoFile"


@pytest.fixture(scope="module")
def stream_clips(comfy, tmp_path_factory):
    """bigbuckbunny cuts with audio at 64x36 in the server's input/: 29 frames, and 61 for the interrupt."""
    made = {}
    for name, frames in ((CLIP, CLIP_FRAMES), (LONG_CLIP, LONG_FRAMES)):
        src = demo_tool.make_clip(demo_tool.bigbuckbunny(), tmp_path_factory.mktemp("stream") / name, frames,
                                  *TEST_CLIP_SIZE)
        made[name] = comfy_server.place_file(src, comfy.base / "input" / name)
    return made


def stream_prompt(input_name, prefix, model=demo_tool.LITEVSR, **inputs):
    """The streaming example of `model` (LiteVSR's long-video example, with the chunking above; or InfVSR's, which
    chunks its own way and takes no adapter) on `input_name`, writing `prefix`."""
    litevsr = model == demo_tool.LITEVSR
    prompt = demo_tool.configure(demo_tool.load_api_workflow(stream=True, model=model), input_name=input_name,
                                 scale=SCALE, steps=1, adapter=demo_tool.NEW_ADAPTER if litevsr else None,
                                 filename_prefix=prefix)
    (node,) = [n for n in prompt.values() if n["class_type"] == NODE]
    node["inputs"].update({"chunk_frames": CHUNK, "overlap_frames": OVERLAP} if litevsr else {}, **inputs)
    return prompt


def leftovers(comfy):
    """Temporary files of the atomic writer (".<name>.<id>.partial.mp4") anywhere under output/."""
    return sorted(str(p) for p in (comfy.base / "output").rglob("*") if p.is_file() and
                  (p.name.startswith(".") or ".partial" in p.name))


def after_first_chunk(comfy, chunks, then):
    """(on_progress callback, temporary files seen): once the node reports chunk 1 of `chunks` done, the callback
    waits up to 30 s for the atomic writer's temporary file (it opens on the first mux), records what it sees and
    calls `then()`, once."""
    seen, called = [], []

    def on_progress(line):
        if line.endswith(f": 1/{chunks}") and not called:
            called.append(line)
            deadline = time.monotonic() + 30
            while not seen and time.monotonic() < deadline:
                seen.extend(leftovers(comfy))
                time.sleep(0.05)
            then()

    return on_progress, seen


def test_long_video_example_streams_clip_with_audio(comfy, stream_clips):
    prompt = stream_prompt(CLIP, "stream_e2e/upscaled")
    prompt["99"] = {"class_type": "PreviewAny", "inputs": {"source": [next(k for k, n in prompt.items()
                                                                          if n["class_type"] == NODE), 0]}}
    paths = comfy.run_prompt(prompt, timeout=300)
    assert len(paths) == 1 and paths[0].is_file(), paths
    assert paths[0].parent == comfy.base / "output" / "stream_e2e" and paths[0].suffix == ".mp4"
    # the node's STRING output is the full path of the file it wrote
    entry = next(iter(comfy.get("/history?max_items=1").values()))
    assert entry["outputs"]["99"]["text"] == [str(paths[0])]
    src, _ = assert_upscaled_copy(paths[0], stream_clips[CLIP], SCALE)
    assert src["frames"] == CLIP_FRAMES and src["size"] == TEST_CLIP_SIZE
    assert leftovers(comfy) == []
    log = comfy.log_tail(200)
    assert "LiteVSR memory plan" in log and "in 6 chunk(s), overlap 4 frames" in log


def test_trimmed_video_is_refused_before_any_work(comfy, object_info, stream_clips):
    """Newer ComfyUI's Trim Video ("Video Slice") hands on the same file with a trim window; reading the file would
    upscale frames the user cut away. The node refuses with the fix, and writes nothing."""
    if "Video Slice" not in object_info:
        pytest.skip("this ComfyUI has no Trim Video (Video Slice) node")
    prompt = stream_prompt(CLIP, "stream_e2e/trimmed")
    (node_id,) = [k for k, n in prompt.items() if n["class_type"] == NODE]
    prompt["98"] = {"class_type": "Video Slice", "inputs": {"video": prompt[node_id]["inputs"]["video"],
                                                            "start_time": 0.2, "duration": 0.5,
                                                            "strict_duration": False}}
    prompt[node_id]["inputs"]["video"] = ["98", 0]
    with pytest.raises(comfy_server.ComfyError, match="trimmed view of its file.*Save the trimmed video first"):
        comfy.run_prompt(prompt, timeout=120)
    assert not list((comfy.base / "output").glob("stream_e2e/trimmed*")) and leftovers(comfy) == []


def test_streaming_node_decodes_with_tiny_decoder(comfy, test_clip):
    """The streaming node with its `decoder` input wired to the stock Load VAE of the tiny decoder (lighttaew2_1,
    models/vae_approx): file to file, exactly N frames at scale x H x W with the audio, and the frames are not the
    Wan VAE's (the same run without the decoder, same seed, writes other pixels)."""
    decoded_by = {}
    for decoder in (demo_tool.TINY_DECODER_NAME, None):
        prompt = stream_prompt(TEST_CLIP, f"stream_e2e/decoded_by_{Path(decoder).stem if decoder else 'wan_vae'}")
        if decoder:
            (node,) = [n for n in prompt.values() if n["class_type"] == NODE]
            prompt["90"] = {"class_type": "VAELoader", "inputs": {"vae_name": decoder}}
            node["inputs"]["decoder"] = ["90", 0]
        (path,) = comfy.run_prompt(prompt, timeout=300)
        src, _ = assert_upscaled_copy(path, test_clip, SCALE)
        assert src["frames"] == TEST_CLIP_FRAMES and src["size"] == TEST_CLIP_SIZE
        decoded_by[decoder] = VideoReader(path).frames(0, TEST_CLIP_FRAMES)
    difference = (decoded_by[demo_tool.TINY_DECODER_NAME] - decoded_by[None]).abs().mean().item()
    assert difference > 0.02, f"the decoder input changed the frames by only {difference:.4f} on average"
    assert leftovers(comfy) == []


@pytest.mark.matrix("Runs", "interrupt during streaming encode")
def test_interrupt_leaves_no_file_and_the_next_run_works(comfy, stream_clips):
    """POST /interrupt once the first chunk is done: the run stops, the temporary file that was being written is
    deleted, nothing appears under the final name, and a run queued right after succeeds."""
    out_dir = comfy.base / "output" / "stream_e2e"
    on_progress, seen_mid_run = after_first_chunk(comfy, LONG_CHUNKS, lambda: comfy.post("/interrupt", {}))
    with pytest.raises(comfy_server.ComfyError, match="interrupted"):
        comfy.run_prompt(stream_prompt(LONG_CLIP, "stream_e2e/interrupted"), timeout=300, on_progress=on_progress)
    assert seen_mid_run, "no temporary output file while the node was running"
    assert not list(out_dir.glob("interrupted*")), "a file appeared under the final name"
    assert leftovers(comfy) == []

    paths = comfy.run_prompt(stream_prompt(TEST_CLIP, "stream_e2e/after_interrupt"), timeout=300)
    assert len(paths) == 1 and probe(paths[0])["frames"] == TEST_CLIP_FRAMES
    assert leftovers(comfy) == []


def test_infvsr_example_streams_clip_with_audio(comfy, stream_clips):
    """The InfVSR example (Load InfVSR Model, Load VAE, Load InfVSR Reference Encoder into the streaming node) on a
    real clip with audio: InfVSR's causal stream, exactly the frames, rate and audio at scale x the size, written
    under a temporary name and renamed only when complete."""
    final_names = []
    on_progress, seen_mid_run = after_first_chunk(comfy, INFVSR_CHUNKS, lambda: final_names.extend(
        (comfy.base / "output" / "stream_e2e").glob("infvsr*")))
    (path,) = comfy.run_prompt(stream_prompt(CLIP, "stream_e2e/infvsr", model=demo_tool.INFVSR), timeout=300,
                               on_progress=on_progress)
    assert path.parent == comfy.base / "output" / "stream_e2e" and path.name.startswith("infvsr")
    src, _ = assert_upscaled_copy(path, stream_clips[CLIP], SCALE)
    assert src["frames"] == CLIP_FRAMES and src["size"] == TEST_CLIP_SIZE
    assert seen_mid_run and not final_names, "the file was not written under a temporary name until complete"
    assert leftovers(comfy) == []
    assert "InfVSR causal stream" in comfy.log_tail(200)


def test_infvsr_without_reference_fails_in_one_line(comfy, stream_clips):
    """An InfVSR model with the reference input left unconnected: the run fails with the node's one line naming the
    node to connect, and writes nothing."""
    prompt = stream_prompt(CLIP, "stream_e2e/infvsr_unreferenced", model=demo_tool.INFVSR)
    (node,) = [n for n in prompt.values() if n["class_type"] == NODE]
    del node["inputs"]["reference"]
    with pytest.raises(comfy_server.ComfyError) as failed:
        comfy.run_prompt(prompt, timeout=120)
    message = str(failed.value)  # node id (class) failed: the node's own one line, nothing after it
    assert f"({NODE}) failed: ValueError: This is an InfVSR model" in message
    assert message.endswith("connect 'Load InfVSR Reference Encoder' to the reference input."), message
    assert not list((comfy.base / "output").glob("stream_e2e/infvsr_unreferenced*")) and leftovers(comfy) == []


def test_make_demo_stream(tmp_path, test_clip):
    """`make demo STREAM=1` on a small clip: the long-video example's API twin, one output file, no leftovers."""
    out = tmp_path / "demo_stream.mp4"
    t0 = time.monotonic()
    r = subprocess.run(["make", "--no-print-directory", "-C", str(REPO), "demo", "STREAM=1",
                        f"INPUT={test_clip}", f"OUTPUT={out}", "SCALE=2"],
                       capture_output=True, text=True, timeout=300, env=make_env())
    print(f"make demo STREAM=1 took {time.monotonic() - t0:.0f} s")
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    assert "litevsr_long_video_api.json" in r.stdout and "LiteVSR memory plan" in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo_stream.mp4"]
    info = probe(out)
    assert info["frames"] == TEST_CLIP_FRAMES and info["size"] == (2 * TEST_CLIP_SIZE[0], 2 * TEST_CLIP_SIZE[1])
    assert info["audio"] == 1
