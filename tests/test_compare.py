"""Compare Before/After (LiteVSR): the node's PNGs and ui entry in-process; on a real headless ComfyUI, the
streaming node's comparison and the `litevsr.progress` events of the streaming and training nodes."""
import json
import re
import urllib.parse
import urllib.request
from io import BytesIO

import numpy as np
import pytest
import torch
from PIL import Image

from tools import comfy_server
from tools import demo as demo_tool
import folder_paths
import workflows
from comfyui_litevsr.nodes.compare_nodes import UI_KEY, LiteVSRCompare
from comfyui_litevsr.nodes.core.frames import resize_frames
from comfyui_litevsr.nodes.core.video_io import VideoReader
from conftest import TEST_CLIP, TEST_CLIP_FRAMES, TEST_CLIP_SIZE


@pytest.fixture
def temp_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(folder_paths, "get_temp_directory", lambda: str(tmp_path))
    return tmp_path


def quantize(frame):
    return (frame.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def png(path):
    with Image.open(path) as image:
        return image.mode, image.size, np.asarray(image.convert("RGB"))


def frames(count, height, width, channels=3, seed=0):
    return torch.rand(count, height, width, channels, generator=torch.Generator().manual_seed(seed))


def compare(before, after, frame):
    with torch.inference_mode():
        out = LiteVSRCompare.execute(before, after, frame)
    assert out.result is None  # an output node without outputs
    (entry,) = out.ui[UI_KEY]
    return entry


def test_writes_two_pngs_of_after_size_middle_frame(temp_dir):
    before, after = frames(9, 8, 12), frames(9, 32, 48, seed=1)
    entry = compare(before, after, -1)
    assert entry["frame"] == 4 and entry["size"] == [48, 32]
    for key in ("before", "after"):
        assert entry[key]["type"] == "temp" and entry[key]["subfolder"] == ""
        assert entry[key]["filename"].endswith(".png")
    mode, size, before_png = png(temp_dir / entry["before"]["filename"])
    assert (mode, size) == ("RGB", (48, 32))
    _, size, after_png = png(temp_dir / entry["after"]["filename"])
    assert size == (48, 32)
    # before is the bicubic resize of the LR frame to after's size; after is the frame itself
    assert np.array_equal(before_png, quantize(resize_frames(before[4:5], 32, 48)[0]))
    assert np.array_equal(after_png, quantize(after[4]))


def test_explicit_frame_alpha_and_unique_names(temp_dir):
    before, after = frames(5, 6, 10, channels=4), frames(5, 12, 20, seed=2)
    first, second = compare(before, after, 0), compare(before, after, 0)
    assert first["frame"] == 0 and first["size"] == [20, 12]
    assert first["before"]["filename"] != second["before"]["filename"]
    assert first["after"]["filename"] != second["after"]["filename"]
    _, _, before_png = png(temp_dir / first["before"]["filename"])
    assert np.array_equal(before_png, quantize(resize_frames(before[0:1, ..., :3], 12, 20)[0]))
    assert len(list(temp_dir.glob("*.png"))) == 4


@pytest.mark.parametrize("before_count,after_count,frame,expected", [
    (9, 9, 9, "frame 9 does not exist (9 frames); use 0..8, or -1 for the middle frame"),
    (9, 9, -2, "frame -2 does not exist"),
    (5, 9, 5, "frame 5 does not exist (5 frames before and 9 after); use 0..4"),
])
def test_bad_frame_index_is_refused(temp_dir, before_count, after_count, frame, expected):
    with pytest.raises(ValueError, match=re.escape(expected)):
        compare(frames(before_count, 4, 4), frames(after_count, 8, 8), frame)
    assert not list(temp_dir.iterdir())


def test_middle_of_the_shorter_input(temp_dir):
    assert compare(frames(5, 4, 4), frames(9, 8, 8), -1)["frame"] == 2


def test_compare_node_schema(object_info):
    info = object_info["LiteVSRCompare"]
    assert info["output_node"] is True and info["category"] == "LiteVSR"
    assert info["display_name"] == "Compare Before/After (LiteVSR)"
    assert list(info["input"]["required"]) == ["before", "after", "frame"]
    assert info["input"]["required"]["frame"][1]["default"] == -1


# --- the streaming node on a real server --------------------------------------------------------------------------


def run_collecting_events(comfy, prompt, timeout=300):
    """Queue `prompt` and wait for it; returns its /history entry and the `litevsr.progress` messages seen."""
    import websocket

    ws = websocket.create_connection(f"ws://{comfy.url.split('://', 1)[1]}/ws?clientId={comfy.client_id}",
                                     timeout=timeout)
    events = []
    try:
        prompt_id = comfy.queue(prompt)
        while True:
            raw = ws.recv()
            if not isinstance(raw, str):
                continue
            message = json.loads(raw)
            data = message.get("data") or {}
            if message.get("type") == "litevsr.progress":
                events.append(data)
            if data.get("prompt_id") != prompt_id:
                continue
            if message.get("type") == "execution_success":
                break
            assert message.get("type") not in ("execution_error", "execution_interrupted"), message
    finally:
        ws.close()
    return comfy.wait_history(prompt_id), events


def fetch_view(comfy, file):
    query = urllib.parse.urlencode({k: file[k] for k in ("filename", "subfolder", "type")})
    with urllib.request.urlopen(f"{comfy.url}/view?{query}") as response:
        return np.asarray(Image.open(BytesIO(response.read())).convert("RGB"))


def test_streaming_node_shows_middle_frame_and_sends_progress(comfy):
    scale = 2
    prompt = demo_tool.configure(demo_tool.load_api_workflow(stream=True), input_name=TEST_CLIP, scale=scale,
                                 steps=1, adapter=demo_tool.NEW_ADAPTER, filename_prefix="compare_e2e/stream")
    (node_id,) = [k for k, n in prompt.items() if n["class_type"] == "LiteVSRUpscaleVideoFile"]
    prompt[node_id]["inputs"].update({"chunk_frames": 5, "overlap_frames": 0})  # 9 frames: 2 chunks
    entry, events = run_collecting_events(comfy, prompt)

    output = entry["outputs"][node_id]
    assert output["images"][0]["type"] == "output" and output["images"][0]["filename"].endswith(".mp4")
    (shown,) = output[UI_KEY]
    width, height = scale * TEST_CLIP_SIZE[0], scale * TEST_CLIP_SIZE[1]
    assert shown["frame"] == TEST_CLIP_FRAMES // 2 and shown["size"] == [width, height]
    before, after = fetch_view(comfy, shown["before"]), fetch_view(comfy, shown["after"])
    assert before.shape == after.shape == (height, width, 3)
    lr = VideoReader(comfy.base / "input" / TEST_CLIP).frames(shown["frame"], 1)
    assert np.array_equal(before, quantize(resize_frames(lr, height, width)[0]))
    # after is the finished middle frame: the written video's frame there, up to x264's loss
    video = VideoReader(comfy.base / "output" / output["images"][0]["subfolder"] / output["images"][0]["filename"])
    written = (video.frames(0, TEST_CLIP_FRAMES).numpy() * 255).astype(np.float32)
    errors = [np.abs(written[i] - after).mean() for i in range(TEST_CLIP_FRAMES)]
    assert int(np.argmin(errors)) == shown["frame"], errors

    mine = [e for e in events if e["node"] == node_id]
    chunks = [e for e in mine if e["stage"] == "chunk"]
    assert [(e["done"], e["total"]) for e in chunks] == [(0, 2), (1, 2), (2, 2)]
    assert chunks[0]["eta_s"] is None and all(e["eta_s"] is not None and e["eta_s"] >= 0 for e in chunks[1:])
    assert chunks[-1]["eta_s"] == 0
    plan = chunks[-1]["plan"]
    assert plan["chunk_frames"] == 5 and plan["overlap_frames"] == 0 and plan["chunks"] == 2
    assert plan["width"] == width and plan["height"] == height and plan["frames"] == TEST_CLIP_FRAMES
    assert isinstance(plan["dit_tile"], list) and len(plan["dit_tile"]) == 2
    assert plan["decode_tile"] > 0 and "decode_tile" in plan["auto"] and "chunk_frames" not in plan["auto"]
    scan = [e for e in mine if e["stage"] == "scene_cuts"]
    assert scan and scan[-1]["done"] == scan[-1]["total"] == TEST_CLIP_FRAMES


def test_training_node_sends_step_events(comfy, tmp_path):
    """Two training steps of the training example on the tiny stand-ins: one event per step with the loss, the ETA
    from the second step on, and the run's settings."""
    folder = "litevsr_progress_train"  # not the example's folder: the training e2e test owns that one
    clip = demo_tool.make_clip(demo_tool.bigbuckbunny(), tmp_path / "bbb.mp4", 9, 64, 64)
    comfy_server.place_file(clip, comfy.base / "input" / folder / "bbb.mp4")
    prompt = workflows.load(workflows.EXAMPLES / "api" / "litevsr_train_api.json")
    kept = {}
    for key, node in prompt.items():
        inputs = node["inputs"]
        if node["class_type"] == "LiteVSRVideoDataset":
            inputs.update(folder=folder, clip_frames=5, width=64, height=64)
        elif node["class_type"] == "LiteVSRDegradation":
            inputs.update(preset="light", scale=4)
        elif node["class_type"] == "LiteVSRTrainAdapter":
            train_id = key
            inputs.update(steps=2, learning_rate=1e-3, checkpoint_every=0, validation_every=0,
                          run_name="progress_events", gradient_checkpointing=False)
        elif node["class_type"] in ("LiteVSRSaveAdapter", "PreviewAny"):
            continue  # nothing saved to models/litevsr
        kept[key] = node
    entry, events = run_collecting_events(comfy, kept)
    steps = [e for e in events if e["node"] == train_id]
    assert [(e["stage"], e["done"], e["total"]) for e in steps] == [("step", 1, 2), ("step", 2, 2)]
    assert steps[0]["eta_s"] is None and steps[1]["eta_s"] == 0
    assert all(isinstance(e["loss"], float) and e["loss"] > 0 for e in steps)
    assert steps[1]["validation_loss"] is not None  # the validation before training
    assert steps[0]["plan"] == {"batch_size": 1, "grad_accumulation": 1, "learning_rate": 1e-3, "clip_frames": 5,
                                "crop": [64, 64], "scale": 4, "precision": "auto", "run_name": "progress_events"}
