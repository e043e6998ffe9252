"""The fault matrix (tests/fault_matrix.py) on the real headless ComfyUI (the session's `comfy` server), `make demo`
and `make train`: each row fails with a clear message that names the fix, or gives the correct result, and the
server keeps working. Rows already covered elsewhere carry the same marker there (the table at the end of the
session lists every test of every row). The last test here runs after the whole matrix (matrix_final): the server
is still up and upscales correctly."""
import json
import os
import pickle
import re
import signal
import struct
import subprocess
import threading
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tools import comfy_server
from tools import demo as demo_tool
from tools import tiny_models
from conftest import REPO, TEST_CLIP, TEST_CLIP_FRAMES, TEST_CLIP_SIZE
from helpers import probe
from workflows import EXAMPLES, load

from comfyui_litevsr.nodes.adapters import new_adapter
from comfyui_litevsr.nodes.core.adapter_file import FORMAT_VERSION, read_header, save_adapter
from comfyui_litevsr.nodes.core.checkpoint import checkpoint_paths, latest_checkpoint, load_checkpoint
from comfyui_litevsr.nodes.core.geometry import BackboneSignature

matrix = pytest.mark.matrix
SCALE = 2
STREAM_NODE = "LiteVSRUpscaleVideoFile"
TINY_WAN21 = BackboneSignature("wan2.1", dim=256, num_layers=2, num_heads=2, latent_channels=16, vae_stride=8)
RSS_TOLERANCE = 64 * 2**20  # server RSS after interrupted runs vs after the same completed run (allocator slack)
ENV = {**{k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")},
       "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}


# --- prompts --------------------------------------------------------------------------------------------------------

def example(input_name, prefix, **settings):
    """The upscale example's API twin at scale 2, 1 step, a new adapter."""
    settings = {"scale": SCALE, "steps": 1, "adapter": demo_tool.NEW_ADAPTER, **settings}
    return demo_tool.configure(demo_tool.load_api_workflow(), input_name=input_name, filename_prefix=prefix,
                               **settings)


def stream(input_name, prefix, node_inputs=None, **settings):
    """The long-video example's API twin (the streaming node) at scale 2, 1 step, a new adapter."""
    settings = {"scale": SCALE, "steps": 1, "adapter": demo_tool.NEW_ADAPTER, **settings}
    prompt = demo_tool.configure(demo_tool.load_api_workflow(stream=True), input_name=input_name,
                                 filename_prefix=prefix, **settings)
    prompt[node(prompt, STREAM_NODE)]["inputs"].update(node_inputs or {})
    return prompt


def node(prompt, class_type):
    (key,) = [key for key, value in prompt.items() if value["class_type"] == class_type]
    return key


TRAIN_FOLDER = "fault_matrix_train"  # in the server's input/


def train_prompt(run_name, steps=4, **train_inputs):
    """The training example's API twin at CPU size: 5-frame 32x32 crops, 1 model call per sample."""
    prompt = load(EXAMPLES / "api" / "litevsr_train_api.json")
    prompt[node(prompt, "LiteVSRVideoDataset")]["inputs"].update(folder=TRAIN_FOLDER, clip_frames=5, width=32,
                                                                  height=32)
    prompt[node(prompt, "LiteVSRDegradation")]["inputs"].update(preset="light", scale=4)
    prompt[node(prompt, "LiteVSRTrainAdapter")]["inputs"].update(
        {"steps": steps, "learning_rate": 1e-3, "max_unrolls": 1, "checkpoint_every": 1, "validation_every": 0,
         "gradient_checkpointing": False, "run_name": run_name, **train_inputs})
    prompt[node(prompt, "LiteVSRSaveAdapter")]["inputs"]["filename_prefix"] = f"fault_matrix_{run_name}"
    return prompt


# --- running prompts: several at once, with interrupts --------------------------------------------------------------

class Runs:
    """Queues prompts on the server and follows them on one websocket. `wait()` returns, per prompt id,
    {"status": "success" | "error" | "interrupted", "node": id, "message": text}. `on_message(msg)` sees every
    message of these prompts (to interrupt at the right moment)."""

    def __init__(self, comfy, on_message=None):
        import websocket

        self.comfy, self.on_message = comfy, on_message
        self.ws = websocket.create_connection(f"ws://{comfy.url.split('://', 1)[1]}/ws?clientId={comfy.client_id}",
                                              timeout=300)
        self.results = {}
        self.ids = []

    def queue(self, prompt):
        prompt_id = self.comfy.queue(prompt)
        self.ids.append(prompt_id)
        return prompt_id

    def wait(self, timeout=300):
        deadline = time.monotonic() + timeout
        try:
            while any(pid not in self.results for pid in self.ids):
                self.ws.settimeout(max(1.0, deadline - time.monotonic()))
                raw = self.ws.recv()
                assert time.monotonic() < deadline, f"prompts not done within {timeout} s: {self.results}"
                if not isinstance(raw, str):
                    continue
                msg = json.loads(raw)
                data = msg.get("data") or {}
                if data.get("prompt_id") not in self.ids:
                    continue
                if self.on_message is not None:
                    self.on_message(msg)
                kind, pid = msg.get("type"), data["prompt_id"]
                if kind == "execution_success":
                    self.results[pid] = {"status": "success"}
                elif kind == "execution_error":
                    self.results[pid] = {"status": "error", "node": data.get("node_id"),
                                         "message": f"{data.get('exception_type')}: {data.get('exception_message')}"}
                elif kind == "execution_interrupted":
                    self.results[pid] = {"status": "interrupted", "node": data.get("node_id")}
        finally:
            self.ws.close()
        return self.results

    def files(self, prompt_id):
        return self.comfy.output_files(self.comfy.wait_history(prompt_id))


def interrupt_at(comfy, node_id, after=1, then=None):
    """on_message for Runs: POST /interrupt for the prompt once its `node_id` reports progress `after` (and call
    `then()` right after, e.g. to queue the next prompt)."""
    fired = []

    def on_message(msg):
        data = msg.get("data") or {}
        if not fired and msg.get("type") == "progress" and data.get("node") == node_id and data["value"] >= after:
            fired.append(data["value"])
            comfy.post("/interrupt", {"prompt_id": data["prompt_id"]})  # this prompt only
            if then is not None:
                then()
    on_message.fired = fired
    return on_message


def fails(comfy, prompt, *needles, node_type=None):
    """Runs a prompt that must fail: one line naming the failing node (and `needles`), no new output file, the
    server still answering. Returns the message."""
    before = output_files(comfy)
    with pytest.raises(comfy_server.ComfyError) as err:
        comfy.run_prompt(prompt, timeout=300)
    message = str(err.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    if node_type is not None:
        assert f"({node_type})" in message, message
    assert output_files(comfy) == before, "a failed run left a file in output/"
    assert_server_up(comfy)
    return message


def output_files(comfy):
    """Every file under output/ but the training example's checkpoints, loss graphs and adapters elsewhere."""
    return {p for p in (comfy.base / "output").rglob("*") if p.is_file()}


def assert_server_up(comfy):
    assert comfy.proc.poll() is None, "ComfyUI exited"
    assert comfy.get("/system_stats")["system"]
    deadline = time.monotonic() + 10  # the websocket's last message may come before the prompt leaves the queue
    while True:
        queue = comfy.get("/queue")
        if queue["queue_running"] == [] and queue["queue_pending"] == []:
            return
        assert time.monotonic() < deadline, f"the queue does not empty: {queue}"
        time.sleep(0.1)


def server_rss(comfy):
    """Resident memory of the server process (psutil, which ComfyUI requires; else /proc)."""
    try:
        import psutil
    except ImportError:
        status = Path(f"/proc/{comfy.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024
    return psutil.Process(comfy.proc.pid).memory_info().rss


def upscaled_ok(paths, frames, size, audio=None, fps=None):
    assert len(paths) == 1 and paths[0].is_file(), paths
    info = probe(paths[0])
    assert info["frames"] == frames and info["size"] == (SCALE * size[0], SCALE * size[1]), info
    if audio is not None:
        assert info["audio"] == audio, info
    if fps is not None:
        assert abs(info["fps"] - fps) < 1e-3, info
    return info


# --- inputs ---------------------------------------------------------------------------------------------------------

def bunny_frames(count, width=64, height=36):
    frames = []
    with av.open(str(demo_tool.bigbuckbunny())) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24", width=width, height=height))
            if len(frames) == count:
                return frames


def tone(container, stream, seconds, pitch):
    rate = stream.codec_context.sample_rate
    wave = np.sin(np.arange(int(seconds * rate)) / rate * 2 * np.pi * pitch).astype(np.float32)
    frame = av.AudioFrame.from_ndarray(np.repeat(wave[None], len(stream.codec_context.layout.channels), axis=0),
                                       format="fltp", layout=stream.codec_context.layout.name)
    frame.sample_rate, frame.pts = rate, 0
    container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def write_video(path, frames, pts=None, time_base=Fraction(1, 25), audio_layouts=()):
    """h264 frames at the given presentation times (variable frame rate when uneven), one tone per audio layout."""
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=25)
        video.height, video.width = frames[0].shape[:2]
        video.pix_fmt = "yuv420p"
        video.codec_context.time_base = time_base
        audios = [container.add_stream("aac", rate=48000, layout=layout) for layout in audio_layouts]
        for index, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts, frame.time_base = (pts[index] if pts else index), time_base
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        for number, audio in enumerate(audios, 1):
            tone(container, audio, len(frames) / 25, 220 * number)
    return path


VFR_PTS = [0, 40, 80, 100, 180, 200, 260, 400, 420, 440, 520, 560]  # ms: gaps of 20 to 140 ms
UNICODE_NAME = "my clip ü 日本 ñ.mp4"
ANIMATED_WEBP_FRAMES = 7


@pytest.fixture(scope="module")
def inputs(comfy):
    """The matrix's input files, in the server's input/ folder."""
    folder = comfy.base / "input"
    frames = bunny_frames(12)
    for count in (1, 2):
        demo_tool.make_clip(demo_tool.bigbuckbunny(), folder / f"fm_{count}_frames.mp4", count, *TEST_CLIP_SIZE)
    demo_tool.make_clip(demo_tool.bigbuckbunny(), folder / "fm_177x97.mp4", 5, 177, 97)  # yuv444p: 4:2:0 cannot be odd
    write_video(folder / "fm_vfr.mp4", frames, VFR_PTS, Fraction(1, 1000))
    write_video(folder / "fm_no_audio.mp4", frames[:9])
    write_video(folder / "fm_two_audio.mp4", frames[:9], audio_layouts=("mono", "stereo"))
    (folder / "fm_not_a_video.mp4").write_text("this is not a video")
    images = [Image.fromarray(frame) for frame in frames[:ANIMATED_WEBP_FRAMES]]
    images[0].save(folder / "fm_animated.webp", save_all=True, append_images=images[1:], duration=40, quality=90)
    demo_tool.make_clip(demo_tool.bigbuckbunny(), folder / UNICODE_NAME, 5, *TEST_CLIP_SIZE)
    with av.open(str(folder / "fm_zero_frames.mp4"), "w", format="mp4") as container:
        video = container.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = 64, 36, "yuv420p"
        container.start_encoding()
    big = [np.full((1152, 2048, 3), 40 * i, np.uint8) for i in range(2)]  # 2 KB on disk; x8 = 16384x9216 out
    write_video(folder / "fm_2048x1152.mp4", big)
    return folder


# --- Models ---------------------------------------------------------------------------------------------------------

@matrix("Models", "non-Wan MODEL")
def test_non_wan_model_is_refused_by_name_on_the_server(comfy, inputs):
    tiny_models.save_tiny_ltxv(comfy.base / "models" / "diffusion_models" / "fm_ltxv.safetensors")
    for prompt in (example(TEST_CLIP, "fm/ltxv", dit="fm_ltxv.safetensors"),
                   stream(TEST_CLIP, "fm/ltxv_stream", dit="fm_ltxv.safetensors")):
        fails(comfy, prompt, "LiteVSR needs a Wan2.1 T2V (1.3B/14B) or Wan2.2 TI2V-5B model from 'Load Diffusion "
                             "Model'; got LTXV (LTXVModel)", node_type="LiteVSRAttachAdapter")


@matrix("Models", "Wan2.1 DiT with a Wan2.2 VAE")
def test_dit_and_vae_of_different_wan_generations_are_refused(comfy, inputs, tiny_dit):
    """Substituted (fault_matrix.NOTES): no tiny Wan2.2 VAE exists. The pack's VAE check against the Wan2.1 DiT
    with a 48-channel VAE in process, and on the server the mirror case, a Wan2.2 TI2V DiT with the Wan2.1 VAE:
    both graphs refuse it naming the fix, before sampling (the streaming node before planning)."""
    from types import SimpleNamespace

    from comfyui_litevsr.nodes.model_nodes import LiteVSRAttachAdapter
    from comfyui_litevsr.nodes.pipeline import check_vae

    patched = LiteVSRAttachAdapter.execute(tiny_dit, demo_tool.NEW_ADAPTER, "direct", 0).result[0]
    with pytest.raises(ValueError, match="The VAE makes 48-channel latents but the wan2.1 DiT expects 16: load the "
                                         r"VAE that matches the model \(Wan2.1 VAE for Wan2.1"):
        check_vae(SimpleNamespace(latent_channels=48), patched)

    tiny_models.save_tiny_wan_dit(comfy.base / "models" / "diffusion_models" / "fm_wan22.safetensors", dim=128,
                                  num_layers=2, family="wan2.2")
    fails(comfy, example(TEST_CLIP, "fm/wan22", dit="fm_wan22.safetensors"),
          "The LR latent has 16 channels but the wan2.2 DiT expects 48: encode with the VAE that matches the model",
          node_type="LiteVSRSampler")
    fails(comfy, stream(TEST_CLIP, "fm/wan22_stream", dit="fm_wan22.safetensors"),
          "The VAE makes 16-channel latents but the wan2.2 DiT expects 48: load the VAE that matches the model",
          node_type=STREAM_NODE)
    assert "LiteVSR memory plan" not in comfy.log_tail(5)


def adapter_file(kind, folder):
    """A broken or foreign adapter file named fm_<kind>.safetensors in `folder`; returns (name, expected text)."""
    path = folder / f"fm_{kind}.safetensors"
    good = folder / "fm_good.tmp"
    save_adapter(good, new_adapter(TINY_WAN21, "direct", 0), None)
    if kind == "other_backbone":
        other = BackboneSignature("wan2.1", dim=128, num_layers=2, num_heads=1, latent_channels=16, vae_stride=8)
        save_adapter(path, new_adapter(other, "direct", 0), None)
        expected = f"was trained for {other.describe()}, but the MODEL is {TINY_WAN21.describe()}. Load the backbone"
    elif kind == "pickle":
        torch.save({"weight": torch.zeros(64)}, path)  # a real torch pickle (.pt), renamed
        expected = "is not a valid safetensors file"
    elif kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        expected = "is truncated"
    elif kind == "huge_header":
        path.write_bytes(struct.pack("<Q", 2**62) + b'{"__metadata__": {}}')
        expected = f"declares a {2**62}-byte header"
    elif kind == "missing_metadata":
        save_file({"x": torch.zeros(2)}, str(path))
        expected = "not a LiteVSR adapter (no 'litevsr-adapter' metadata): pick an adapter written by Save Adapter"
    elif kind == "wrong_metadata":
        save_file(load_file(str(good)), str(path), metadata={"format": "litevsr-adapter", "format_version": "one"})
        expected = "has missing or invalid LiteVSR metadata"
    elif kind == "newer_format":
        metadata = {**read_header(good)["__metadata__"], "format_version": str(FORMAT_VERSION + 1)}
        save_file(load_file(str(good)), str(path), metadata=metadata)
        expected = (f"was written by a newer LiteVSR (adapter format {FORMAT_VERSION + 1}; this pack reads up to "
                    f"{FORMAT_VERSION}). Update ComfyUI-LiteVSR")
    good.unlink()
    return path.name, expected


ADAPTER_ROWS = {
    "other_backbone": "adapter from another backbone",
    "pickle": "adapter file that is a pickle renamed to .safetensors",
    "truncated": "truncated safetensors",
    "huge_header": "header with a huge declared size",
    "missing_metadata": "wrong or missing metadata",
    "wrong_metadata": "wrong or missing metadata",
    "newer_format": "adapter from a newer format version",
}


@pytest.mark.parametrize("kind", [pytest.param(kind, marks=matrix("Models", row))
                                  for kind, row in ADAPTER_ROWS.items()])
def test_broken_adapter_file_is_refused_on_the_server(comfy, inputs, kind):
    """The file in models/litevsr, picked in Attach State-Aware Adapter of the upscale example: the run fails at
    that node with the file's name and what to do, and the server keeps working."""
    name, expected = adapter_file(kind, comfy.base / "models" / "litevsr")
    message = fails(comfy, example(TEST_CLIP, f"fm/adapter_{kind}", adapter=name), name, expected,
                    node_type="LiteVSRAttachAdapter")
    assert "AdapterFileError" in message


@matrix("Models", "torch.load only with weights_only=True, never reached for a non-safetensors adapter")
def test_torch_load_is_never_reached_and_never_unsafe(tmp_path, monkeypatch):
    """Static: no torch.load call without weights_only=True anywhere in the repository's Python (pack, tools,
    bench, tests). Dynamic: every unpickling entry point (torch.load, pickle.load(s), ComfyUI's load_torch_file)
    and safetensors' own loader are trapped while the adapter loader and the Attach node meet a real torch
    pickle, a zip .pt and a pickle, each named .safetensors: all refused, none reached."""
    import comfy.utils
    import folder_paths
    import safetensors.torch

    from comfyui_litevsr.nodes.core import adapter_file as adapter_file_module
    from comfyui_litevsr.nodes.core.adapter_file import AdapterFileError, load_adapter
    from comfyui_litevsr.nodes.adapters import adapter_from_choice

    offenders = []
    sources = sorted(REPO.glob("*.py")) + [path for folder in ("nodes", "tools", "bench", "tests")
                                            for path in sorted((REPO / folder).rglob("*.py"))]
    assert len(sources) > 40
    for source in sources:
        for call in re.finditer(r"torch\.load\(([^)]*)\)", source.read_text(errors="replace")):
            if "weights_only=True" not in call.group(1):
                offenders.append(f"{source.relative_to(REPO)}: {call.group(0)}")
    assert not offenders, offenders

    reached = []

    def trap(name):
        def trapped(*args, **kwargs):
            reached.append(name)
            raise AssertionError(f"{name} was reached")
        return trapped

    for owner, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"),
                        (comfy.utils, "load_torch_file"), (safetensors.torch, "load_file"),
                        (adapter_file_module, "load_file")):
        monkeypatch.setattr(owner, name, trap(f"{getattr(owner, '__name__', owner)}.{name}"))
    folder = tmp_path / "litevsr"
    folder.mkdir()
    torch.save({"weight": torch.zeros(8)}, folder / "zip_pt.safetensors")  # torch's zip format
    torch.save({"weight": torch.zeros(8)}, folder / "legacy_pt.safetensors", _use_new_zipfile_serialization=False)
    (folder / "pickle.safetensors").write_bytes(pickle.dumps({"weight": [0.0] * 8}))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "litevsr", ([str(folder)], {".safetensors"}))
    for path in sorted(folder.iterdir()):
        with pytest.raises(AdapterFileError, match="not a valid safetensors file|corrupt safetensors header"):
            load_adapter(path, TINY_WAN21)
        with pytest.raises(AdapterFileError):
            adapter_from_choice(TINY_WAN21, path.name, "direct", 0)
    assert reached == []


# --- Video ----------------------------------------------------------------------------------------------------------

@matrix("Video", "zero frames")
def test_zero_frame_video_in_the_streaming_node(comfy, inputs):
    """The pack's own reader names it (the example graph fails earlier, in ComfyUI's Get Video Components:
    tests/test_e2e.py)."""
    fails(comfy, stream("fm_zero_frames.mp4", "fm/zero"), "no video stream in", "fm_zero_frames.mp4",
          node_type=STREAM_NODE)


@pytest.mark.parametrize("count", [pytest.param(1, marks=matrix("Video", "one frame")),
                                   pytest.param(2, marks=matrix("Video", "2 frames"))])
def test_one_and_two_frame_videos(comfy, inputs, count):
    name = f"fm_{count}_frames.mp4"
    upscaled_ok(comfy.run_prompt(example(name, f"fm/frames_{count}")), count, TEST_CLIP_SIZE, audio=1, fps=25)
    upscaled_ok(comfy.run_prompt(stream(name, f"fm/frames_{count}_stream")), count, TEST_CLIP_SIZE, audio=1, fps=25)


@matrix("Video", "odd sizes (177x97)")
def test_odd_size_video(comfy, inputs):
    """177x97 (yuv444p in, padded to the 16 px grid inside, cropped back): exactly 354x194 out of both graphs."""
    upscaled_ok(comfy.run_prompt(example("fm_177x97.mp4", "fm/odd")), 5, (177, 97), audio=1)
    upscaled_ok(comfy.run_prompt(stream("fm_177x97.mp4", "fm/odd_stream")), 5, (177, 97), audio=1)


@matrix("Video", "sizes that blow the memory budget")
def test_output_larger_than_memory_is_refused_before_allocating(comfy, inputs):
    """2048x1152 at x8 is 16384x9216: the streaming node's planner refuses it before anything is decoded or
    allocated (server RSS unchanged within 64 MiB), naming the stage, the sizes and the fix. (Downsizing, and
    refusal on device memory, are the planner's unit tests in tests/test_memory.py, also in this row.)"""
    rss = server_rss(comfy)
    message = fails(comfy, stream("fm_2048x1152.mp4", "fm/huge", {"scale": 8}),
                    "LiteVSR cannot fit 16384x9216 px x 2 frames in the memory available: even the smallest settings",
                    "To fix: close other programs, or lower the output size or the frame count", node_type=STREAM_NODE)
    assert "stream the output" not in message  # it already streams
    assert server_rss(comfy) - rss < RSS_TOLERANCE


@matrix("Video", "variable frame rate")
def test_variable_frame_rate_keeps_every_frame_at_the_average_rate(comfy, inputs):
    with av.open(str(inputs / "fm_vfr.mp4")) as container:
        average = Fraction(container.streams.video[0].average_rate)
        decoded = [frame.time for frame in container.decode(video=0)]
    assert len(decoded) == len(VFR_PTS) and len({round(b - a, 3) for a, b in zip(decoded, decoded[1:])}) > 3
    upscaled_ok(comfy.run_prompt(example("fm_vfr.mp4", "fm/vfr")), len(VFR_PTS), TEST_CLIP_SIZE, fps=average)
    upscaled_ok(comfy.run_prompt(stream("fm_vfr.mp4", "fm/vfr_stream")), len(VFR_PTS), TEST_CLIP_SIZE, fps=average)


@matrix("Video", "a file that is not a video")
def test_file_that_is_not_a_video(comfy, inputs):
    """The example graph fails in ComfyUI's own Get Video Components (its wording: 'Invalid data'); the streaming
    node says what it is."""
    fails(comfy, example("fm_not_a_video.mp4", "fm/not_video"), "Invalid data", node_type="GetVideoComponents")
    fails(comfy, stream("fm_not_a_video.mp4", "fm/not_video_stream"), "not a video file",
          str(inputs / "fm_not_a_video.mp4"), node_type=STREAM_NODE)


@matrix("Video", "no audio")
def test_video_without_audio(comfy, inputs):
    upscaled_ok(comfy.run_prompt(example("fm_no_audio.mp4", "fm/no_audio")), 9, TEST_CLIP_SIZE, audio=0)
    upscaled_ok(comfy.run_prompt(stream("fm_no_audio.mp4", "fm/no_audio_stream")), 9, TEST_CLIP_SIZE, audio=0)


@matrix("Video", "two audio streams")
def test_video_with_two_audio_streams(comfy, inputs):
    """The streaming node copies both tracks (mono, stereo); the example graph keeps one (ComfyUI's Get Video
    Components hands on a single AUDIO)."""
    upscaled_ok(comfy.run_prompt(example("fm_two_audio.mp4", "fm/two_audio")), 9, TEST_CLIP_SIZE, audio=1)
    (path,) = comfy.run_prompt(stream("fm_two_audio.mp4", "fm/two_audio_stream"))
    upscaled_ok([path], 9, TEST_CLIP_SIZE, audio=2)
    with av.open(str(path)) as container:
        assert [s.codec_context.channels for s in container.streams.audio] == [1, 2]


@matrix("Video", "animated webp")
def test_animated_webp(comfy, inputs):
    """Load Image reads an animated WebP's frames: the short-clip graph upscales all of them. The streaming node
    (ffmpeg cannot decode animated WebP) refuses it and names that route."""
    prompt = example(TEST_CLIP, "fm/webp")
    load_video, components = node(prompt, "LoadVideo"), node(prompt, "GetVideoComponents")
    prompt[load_video] = {"class_type": "LoadImage", "inputs": {"image": "fm_animated.webp"}}
    del prompt[components]
    prompt[node(prompt, "LiteVSREncodeVideo")]["inputs"]["images"] = [load_video, 0]
    prompt[node(prompt, "LiteVSRColorCorrect")]["inputs"]["reference"] = [load_video, 0]
    prompt[node(prompt, "CreateVideo")]["inputs"] = {"images": [node(prompt, "LiteVSRColorCorrect"), 0], "fps": 25.0}
    upscaled_ok(comfy.run_prompt(prompt), ANIMATED_WEBP_FRAMES, TEST_CLIP_SIZE, audio=0, fps=25)
    fails(comfy, stream("fm_animated.webp", "fm/webp_stream"), "Animated WebP is not a video ffmpeg reads: convert "
          "it to mp4, or load it with Load Image", node_type=STREAM_NODE)


@matrix("Video", "path with spaces and non-ASCII characters")
def test_path_with_spaces_and_non_ascii(comfy, inputs, tmp_path):
    """In the server's input/ for both graphs, and as INPUT and OUTPUT of `make demo`."""
    upscaled_ok(comfy.run_prompt(example(UNICODE_NAME, "fm/ünï cödé")), 5, TEST_CLIP_SIZE, audio=1)
    (path,) = comfy.run_prompt(stream(UNICODE_NAME, "fm/ünï cödé stream"))
    assert path.name.startswith("ünï cödé stream_")
    upscaled_ok([path], 5, TEST_CLIP_SIZE, audio=1)

    folder = tmp_path / "dir with spaces ü 日本"
    folder.mkdir()
    source = folder / UNICODE_NAME
    source.write_bytes((inputs / UNICODE_NAME).read_bytes())
    out = folder / "out put é" / "démo ñ.mp4"
    done = subprocess.run(["make", "--no-print-directory", "-C", str(REPO), "demo", f"INPUT={source}",
                           f"OUTPUT={out}", f"SCALE={SCALE}"], capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    upscaled_ok([out], 5, TEST_CLIP_SIZE, audio=1)
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]


# --- Runs -----------------------------------------------------------------------------------------------------------

def interrupt_in_node(comfy, prompt, node_id, prefix):
    """Queues `prompt`, interrupts it after `node_id`'s first progress update: it must stop in that node, save no
    video, and leave the server up."""
    runs = Runs(comfy, interrupt_at(comfy, node_id, after=1))
    prompt_id = runs.queue(prompt)
    results = runs.wait()
    assert results[prompt_id]["status"] == "interrupted", results
    assert results[prompt_id]["node"] == node_id, results
    assert not list((comfy.base / "output" / "fm").glob(f"{prefix}*")), "an interrupted run saved a video"
    assert_server_up(comfy)


@matrix("Runs", "interrupt during sampling")
def test_interrupt_during_sampling(comfy, inputs):
    prompt = example(TEST_CLIP, "fm/interrupt_sampling", steps=50)
    sampler = node(prompt, "LiteVSRSampler")
    prompt[sampler]["inputs"]["seed"] = 101  # not a cached result
    interrupt_in_node(comfy, prompt, sampler, "interrupt_sampling")


@matrix("Runs", "interrupt during decode")
def test_interrupt_during_decode(comfy, inputs):
    """Tiled Decode at x4 in 64 px tiles overlapping by 32 (28 tiles): interrupted after the first tile, inside the
    decode node."""
    prompt = example(TEST_CLIP, "fm/interrupt_decode", scale=4)
    decode = node(prompt, "LiteVSRTiledDecode")
    prompt[decode]["inputs"].update(tile_size=64, overlap=32)
    prompt[node(prompt, "LiteVSRSampler")]["inputs"]["seed"] = 102
    interrupt_in_node(comfy, prompt, decode, "interrupt_decode")


@matrix("Runs", "second run queued right after an interrupted one (memory back to baseline)")
def test_run_queued_right_after_an_interrupt_works_and_memory_returns_to_baseline(comfy, inputs):
    """Baseline: the server's RSS after a completed run of the upscale example. Then twice: a 50-step run
    interrupted during sampling, with the next run (the baseline's graph, another seed) queued the moment the
    interrupt is sent; each next run is complete and correct, and afterwards the server's RSS is back within
    RSS_TOLERANCE (64 MiB) of the baseline."""
    def prompt(seed, prefix, steps=1):
        graph = example(TEST_CLIP, f"fm/{prefix}", steps=steps)
        graph[node(graph, "LiteVSRSampler")]["inputs"]["seed"] = seed
        return graph

    comfy.run_prompt(prompt(200, "baseline"), timeout=300)
    baseline = server_rss(comfy)
    sampler = node(prompt(0, "x"), "LiteVSRSampler")
    rss = []
    for cycle in range(2):
        runs = Runs(comfy)
        queued = []
        runs.on_message = interrupt_at(comfy, sampler, after=1,
                                       then=lambda: queued.append(runs.queue(prompt(300 + cycle, f"after_{cycle}"))))
        first = runs.queue(prompt(210 + cycle, f"interrupted_{cycle}", steps=50))
        results = runs.wait()
        assert results[first] == {"status": "interrupted", "node": sampler}, results
        (second,) = queued
        assert results[second]["status"] == "success", results
        upscaled_ok(runs.files(second), TEST_CLIP_FRAMES, TEST_CLIP_SIZE, audio=1)
        assert not list((comfy.base / "output" / "fm").glob(f"interrupted_{cycle}*"))
        rss.append(server_rss(comfy))
    print(f"\n[fault matrix] server RSS: baseline {baseline / 2**20:.0f} MiB, after each interrupted + next run: "
          + ", ".join(f"{value / 2**20:.0f} MiB" for value in rss))
    assert max(rss) - baseline < RSS_TOLERANCE
    assert_server_up(comfy)


@matrix("Runs", "two workflows queued concurrently")
def test_two_workflows_queued_back_to_back(comfy, inputs):
    """The upscale example and the long-video example queued at once (before either starts): both complete, each
    with its own correct file."""
    runs = Runs(comfy)
    short = example(TEST_CLIP, "fm/concurrent_short")
    short[node(short, "LiteVSRSampler")]["inputs"]["seed"] = 401
    long = stream(TEST_CLIP, "fm/concurrent_long", {"seed": 402})
    ids = [runs.queue(short), runs.queue(long)]
    results = runs.wait()
    assert [results[i]["status"] for i in ids] == ["success", "success"], results
    first, second = (runs.files(i) for i in ids)
    upscaled_ok(first, TEST_CLIP_FRAMES, TEST_CLIP_SIZE, audio=1)
    upscaled_ok(second, TEST_CLIP_FRAMES, TEST_CLIP_SIZE, audio=1)
    assert first[0].parent.name == "fm" and first[0].name.startswith("concurrent_short")
    assert second[0].name.startswith("concurrent_long")
    assert_server_up(comfy)


@pytest.fixture(scope="module")
def train_folder(comfy):
    folder = comfy.base / "input" / TRAIN_FOLDER
    folder.mkdir(exist_ok=True)
    demo_tool.make_clip(demo_tool.bigbuckbunny(), folder / "bbb.mp4", 13, 64, 48)
    return folder


@matrix("Runs", "interrupt during training checkpoint write")
def test_interrupt_while_training_checkpoints_every_step(comfy, train_folder):
    """The training example with a checkpoint after every step, interrupted after step 2: the run stops, every
    checkpoint on disk is complete (adapter + optimizer state, no temporary file), the newest loads, and a resumed
    run finishes from it. (ComfyUI's interrupt is a flag checked between steps; a write cut in half by SIGKILL is
    tests/test_training.py's, also in this row.)"""
    run_name = "fm_interrupted"
    prompt = train_prompt(run_name, steps=6)
    train = node(prompt, "LiteVSRTrainAdapter")
    runs = Runs(comfy, interrupt_at(comfy, train, after=2))
    prompt_id = runs.queue(prompt)
    results = runs.wait()
    assert results[prompt_id] == {"status": "interrupted", "node": train}, results
    folder = comfy.base / "output" / "litevsr_training" / run_name
    names = sorted(p.name for p in folder.iterdir())
    step = latest_checkpoint(folder)
    assert step is not None and 2 <= step < 6, names
    assert not [name for name in names if name.startswith(".")], names  # no half-written temporary
    for done in range(1, step + 1):
        if checkpoint_paths(folder, done)[0].exists():
            assert all(p.exists() for p in checkpoint_paths(folder, done)), names
    _, _, tensors, state, _ = load_checkpoint(folder, step, TINY_WAN21)
    assert state["step"] == step and len(tensors["losses"]) == step
    assert not list((comfy.base / "models" / "litevsr").glob(f"fault_matrix_{run_name}*"))  # nothing saved

    comfy.run_prompt(train_prompt(run_name, steps=6, resume=True), timeout=300)
    assert latest_checkpoint(folder) == 6
    assert list((comfy.base / "models" / "litevsr").glob(f"fault_matrix_{run_name}_00001.safetensors"))
    assert_server_up(comfy)


# --- Training (make train) ------------------------------------------------------------------------------------------

MAKE_TRAIN = ["make", "-s", "--no-print-directory", "-C", str(REPO), "train"]
TRAIN_ARGS = "--crop 32x32 --clip-frames 5 --max-unrolls 2 --seed 3 --checkpoint-every 1"
KILL_STEPS = 40  # about 0.1 s a step on the CPU: the kill after step 3 lands well before the end


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory):
    """One good clip, and files a training folder picks up by their names that are not usable videos."""
    folder = tmp_path_factory.mktemp("fm_train_data")
    demo_tool.make_clip(demo_tool.bigbuckbunny(), folder / "good.mp4", 20, 64, 48)
    (folder / "broken.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    (folder / "empty.mov").write_bytes(b"")
    (folder / "sub").mkdir()
    (folder / "sub" / "text.mkv").write_text("not a video")
    (folder / "dangling.webm").symlink_to(folder / "nowhere.webm")
    (folder / "notes.txt").write_text("ignored: not a video suffix")
    return folder


@matrix("Training", "kill -9 mid-run then resume")
@matrix("Training", "dataset folder with unreadable files mixed in")
def test_make_train_killed_then_resumed_on_a_folder_with_unreadable_files(tmp_path, mixed_data):
    """`make train` (checkpoint every step) on a folder where 3 of 4 video files are unreadable: they are listed
    in one warning and training goes on. SIGKILL to make and its Python once step 3 (of 40) is logged; RESUME=1
    continues from the newest complete checkpoint and ends at step 40 with every step logged."""
    out = tmp_path / "killed.safetensors"
    command = MAKE_TRAIN + [f"DATA={mixed_data}", f"OUT={out}", f"STEPS={KILL_STEPS}", f"TRAIN_ARGS={TRAIN_ARGS}"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**ENV, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    lines = []
    timer = threading.Timer(240, lambda: os.killpg(proc.pid, signal.SIGKILL))
    timer.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            if "] step 3/" in line:
                os.killpg(proc.pid, signal.SIGKILL)  # make and the training process: kill -9, no clean-up
                break
        proc.wait(30)
    finally:
        timer.cancel()
    output = "".join(lines)
    assert proc.returncode == -signal.SIGKILL, output[-3000:]
    assert "skipped 3 of 4 files" in output, output[-3000:]
    for name in ("broken.mp4", "empty.mov", "text.mkv"):
        assert name in output and f"{name}: unreadable" in output, output[-3000:]
    assert "good.mp4" not in output.split("skipped", 1)[1].split("training videos")[0]
    assert "1 training videos" in output
    assert not out.exists() and not Path(f"{out}.log.json").exists()  # only ever written complete
    folder = Path(f"{out}.checkpoints")
    killed_at = latest_checkpoint(folder)
    assert killed_at is not None and 3 <= killed_at < KILL_STEPS, sorted(p.name for p in folder.iterdir())

    done = subprocess.run(MAKE_TRAIN + [f"DATA={mixed_data}", f"OUT={out}", f"STEPS={KILL_STEPS}", "RESUME=1",
                                        f"TRAIN_ARGS={TRAIN_ARGS}"], capture_output=True, text=True, env=ENV,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert f"from checkpoint step {killed_at}" in done.stdout and f"step {KILL_STEPS}/{KILL_STEPS}" in done.stdout
    assert f"step {killed_at}/{KILL_STEPS}" not in done.stdout  # finished steps are not trained again
    log = json.loads(Path(f"{out}.log.json").read_text())
    assert log["resumed_from"] == killed_at
    assert [entry["step"] for entry in log["steps"]] == list(range(1, KILL_STEPS + 1))
    assert read_header(str(out))["__metadata__"]["train_steps"] == str(KILL_STEPS)


@matrix("Training", "dataset with no usable clip")
def test_make_train_on_a_folder_without_a_usable_clip(tmp_path, mixed_data):
    """Only unusable files (unreadable, too short, too small): one clear line of what is needed, exit 1, nothing
    written."""
    folder = tmp_path / "unusable"
    folder.mkdir()
    for name in ("broken.mp4", "empty.mov"):
        (folder / name).write_bytes((mixed_data / name).read_bytes())
    demo_tool.make_clip(demo_tool.bigbuckbunny(), folder / "short.mp4", 3, 64, 48)  # 3 frames < 5
    demo_tool.make_clip(demo_tool.bigbuckbunny(), folder / "small.mp4", 9, 16, 16)  # 16x16 < 32x32
    out = tmp_path / "out" / "a.safetensors"
    done = subprocess.run(MAKE_TRAIN + [f"DATA={folder}", f"OUT={out}", "STEPS=2", f"TRAIN_ARGS={TRAIN_ARGS}"],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode != 0
    text = done.stdout + done.stderr
    assert f"no training clips in {folder}: none of its 4 video files is usable. Needed: " in text, text[-3000:]
    assert "with at least 5 frames (5 at stride 1) and at least 32x32 pixels" in text
    assert "short.mp4: too short: 3 frames, 5 needed" in text and "small.mp4: too small: 16x16" in text
    assert not out.exists() and not Path(f"{out}.log.json").exists()


# --- Paths ----------------------------------------------------------------------------------------------------------

@matrix("Paths", "model names with .. or absolute paths")
def test_model_names_cannot_leave_the_model_folders(comfy, inputs, train_folder):
    """Stock loaders: ComfyUI's validation refuses names not in the folder's list. The pack's adapter combos (Attach,
    Train) are refused the same way on newer ComfyUI; 0.3.75 lets them through to folder_paths, which resolves any
    name inside models/litevsr, so a file elsewhere is not found."""
    vae_path = comfy.base / "models" / "vae" / demo_tool.VAE_NAME
    for dit in ("../vae/" + demo_tool.VAE_NAME, str(vae_path)):
        fails(comfy, example(TEST_CLIP, "fm/model_path", dit=dit), "prompt rejected", "Value not in list")
    for vae in ("../diffusion_models/" + demo_tool.DIT_NAME, "/etc/passwd"):
        fails(comfy, example(TEST_CLIP, "fm/model_path", vae=vae), "prompt rejected", "Value not in list")
    outside = comfy.base / "models" / "diffusion_models" / "fm_outside.safetensors"
    save_adapter(outside, new_adapter(TINY_WAN21, "direct", 0), None)  # a valid adapter, in the wrong folder
    for adapter in ("../diffusion_models/fm_outside.safetensors", str(outside)):
        for graph, node_type in ((example(TEST_CLIP, "fm/model_path", adapter=adapter), "LiteVSRAttachAdapter"),
                                 (train_prompt("fm_adapter_path", steps=1, adapter=adapter), "LiteVSRTrainAdapter")):
            message = fails(comfy, graph, node_type=node_type)
            # 0.3.75 lets the name through validation and folder_paths does not find it; newer ComfyUI already
            # refuses a combo value that is not in the list. Either way: refused, nothing read, nothing written.
            assert "Value not in list" in message or \
                ("Model in folder 'litevsr' with filename" in message and "not found" in message), message


@matrix("Paths", "output names with .. or absolute paths")
def test_output_names_cannot_leave_the_output_folders(comfy, inputs, train_folder, tmp_path, monkeypatch):
    """Streaming node: refused up front, naming the fix; Save Video (stock): ComfyUI's own refusal; Train: the run
    name; Save Adapter: the prefix (called as ComfyUI calls it, with models/litevsr in a temporary folder). Nothing
    is written anywhere."""
    import folder_paths

    from comfyui_litevsr.nodes.train_nodes import LiteVSRSaveAdapter

    outside = tmp_path / "escape"
    for prefix in ("../fm_escape", "fm/../../fm_escape", str(outside / "x")):
        fails(comfy, stream(TEST_CLIP, prefix), f"filename_prefix {prefix!r} leads outside ComfyUI's output folder: "
              "give a name inside it", node_type=STREAM_NODE)
        fails(comfy, example(TEST_CLIP, prefix), "Saving image outside the output folder is not allowed",
              node_type="SaveVideo")
    for run_name in ("../fm_escape", str(outside)):
        fails(comfy, train_prompt(run_name, steps=1), f"run_name {run_name!r}: use letters, digits",
              node_type="LiteVSRTrainAdapter")
    assert not (comfy.base / "fm_escape").exists() and not outside.exists()
    assert not list(comfy.base.glob("fm_escape*")) and not list((comfy.base / "output").glob("fm_escape*"))

    models = tmp_path / "models" / "litevsr"
    models.mkdir(parents=True)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "litevsr", ([str(models)], {".safetensors"}))
    adapter = {"adapter": new_adapter(TINY_WAN21, "direct", 0), "context": None, "metadata": {}}
    for prefix in ("../escape", "/tmp/escape", "a/../../escape", "a/./b", ".hidden"):
        with pytest.raises(ValueError, match="filename_prefix .*: letters, digits, '_', '-', '.', and '/' for "
                                             "subfolders of models/litevsr"):
            LiteVSRSaveAdapter.execute(adapter, prefix)
    assert LiteVSRSaveAdapter.execute(adapter, "sub/ok").result[0] == "sub/ok_00001.safetensors"
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        "models/litevsr/sub/ok_00001.safetensors"]


@matrix("Paths", "Video Dataset folder outside input")
def test_dataset_folder_relative_paths_stay_in_input(comfy, train_folder, tmp_path, monkeypatch):
    """Decided (README): an absolute folder may be anywhere (training data is only read); a relative folder is a
    folder inside input/, and one that leads out of it with '..' is refused, naming both choices."""
    import folder_paths

    from comfyui_litevsr.nodes.train_nodes import LiteVSRVideoDataset

    prompt = train_prompt("fm_dataset_path", steps=1)
    prompt[node(prompt, "LiteVSRVideoDataset")]["inputs"]["folder"] = f"../{TRAIN_FOLDER}"
    fails(comfy, prompt, "the relative folder '../fault_matrix_train' leads out of ComfyUI's input folder; give a "
          "folder inside input/, or the folder's absolute path", node_type="LiteVSRVideoDataset")

    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(tmp_path / "input"))
    (tmp_path / "input" / "clips").mkdir(parents=True)
    (tmp_path / "input" / "clips" / "bbb.mp4").write_bytes((train_folder / "bbb.mp4").read_bytes())
    for folder in ("clips", "clips/../clips", "../input/clips", str(train_folder)):  # in input/, or absolute
        (dataset,) = LiteVSRVideoDataset.execute(folder, 5, 32, 32, 1, 0).result
        assert len(dataset.videos) == 1
    for folder in ("..", "../clips", "clips/../../elsewhere"):
        with pytest.raises(ValueError, match="leads out of ComfyUI's input folder"):
            LiteVSRVideoDataset.execute(folder, 5, 32, 32, 1, 0)


# --- after the whole matrix -----------------------------------------------------------------------------------------

@pytest.mark.matrix_final
@matrix("Server", "after the matrix: server still up, normal upscale correct")
def test_after_the_matrix_the_server_is_up_and_upscales_correctly(comfy, test_clip):
    """Runs last in the session (matrix_final): the same server that went through every row above answers, its
    queue is empty, and the upscale example gives the right file (frames, size, frame rate, audio)."""
    assert_server_up(comfy)
    prompt = example(TEST_CLIP, "fm/final")
    prompt[node(prompt, "LiteVSRSampler")]["inputs"]["seed"] = 999
    info = upscaled_ok(comfy.run_prompt(prompt, timeout=300), TEST_CLIP_FRAMES, TEST_CLIP_SIZE, audio=1, fps=25)
    assert probe(test_clip)["frames"] == info["frames"]
    assert_server_up(comfy)
