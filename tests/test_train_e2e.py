"""End to end on a real headless ComfyUI: the training example (Video Dataset -> Degradation -> Train Adapter ->
Save Adapter, Plot Loss Graph) on a real clip folder, resumed from its checkpoint, and the saved adapter then
changing what the upscale example produces."""
import json
import re
import time

import av
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tools import comfy_server
from tools import demo as demo_tool
from conftest import TEST_CLIP
from workflows import EXAMPLES, load

from comfyui_litevsr.nodes.core.adapter_file import read_adapter_config

TRAIN_API = EXAMPLES / "api" / "litevsr_train_api.json"
TRAIN_FOLDER = "litevsr_train"  # the example's dataset folder, relative to the server's input/
RUN_NAME = "e2e_run"
PREFIX = "litevsr_e2e"
STEPS, RESUMED_STEPS, EVERY = 4, 6, 2
CLIP_FRAMES, CROP = 5, 64  # the crop: a multiple of 16 (Wan2.1 token) and of the scale
SCALE = 4
TRAIN = "LiteVSRTrainAdapter"
MIN_OUTPUT_DIFF = 0.005  # mean |trained - zero-init| over the decoded frames (0..1); measured values are printed


def nodes_of(prompt, class_type):
    return [(key, node) for key, node in prompt.items() if node["class_type"] == class_type]


def cpu_prompt(path, node, prefix, **train_inputs):
    """A training example's API twin with CPU-sized settings (the graph and every other value as shipped): its
    training `node` gets `train_inputs`, its Save node `prefix`."""
    prompt = load(path)
    (_, dataset), = nodes_of(prompt, "LiteVSRVideoDataset")
    assert dataset["inputs"]["folder"] == TRAIN_FOLDER
    dataset["inputs"].update(clip_frames=CLIP_FRAMES, width=CROP, height=CROP)
    (_, degradation), = nodes_of(prompt, "LiteVSRDegradation")
    degradation["inputs"].update(preset="light", scale=SCALE)
    (_, train), = nodes_of(prompt, node)
    train["inputs"].update({"steps": STEPS, "learning_rate": 1e-3, "checkpoint_every": EVERY,
                            "validation_every": EVERY, "gradient_checkpointing": True, **train_inputs})
    (_, save), = nodes_of(prompt, "LiteVSRSaveAdapter")
    save["inputs"]["filename_prefix"] = prefix
    return prompt


def train_prompt(**train_inputs):
    return cpu_prompt(TRAIN_API, TRAIN, PREFIX, **{"run_name": RUN_NAME, **train_inputs})


def run_training(comfy, prompt, node=TRAIN):
    """Runs the prompt; returns (history entry, progress lines of the training node, seconds)."""
    train_id = nodes_of(prompt, node)[0][0]
    progress = []
    t0 = time.monotonic()
    comfy.run_prompt(prompt, timeout=600, on_progress=lambda line: progress.append(line))
    seconds = time.monotonic() - t0
    entry = next(iter(comfy.get("/history?max_items=1").values()))
    assert entry["status"]["status_str"] == "success", entry["status"]
    return entry, [line for line in progress if line.startswith(f"node {train_id}: ")], seconds


def saved_name(prompt, entry):
    """The adapter file name as the Save node returned it (shown by the example's Preview Any node)."""
    (preview_id, _), = nodes_of(prompt, "PreviewAny")
    (name,) = entry["outputs"][preview_id]["text"]
    return name


def checkpoint_dir(comfy, run_name=RUN_NAME):
    return comfy.base / "output" / "litevsr_training" / run_name


def checkpoint_files(comfy):
    return sorted(p.name for p in checkpoint_dir(comfy).iterdir())


def state_losses(comfy, step, run_name=RUN_NAME):
    with safe_open(str(checkpoint_dir(comfy, run_name) / f"step_{step:08d}.state.safetensors"), "pt") as f:
        return f.get_tensor("losses").tolist()


def adapter_options(comfy):
    """The Attach node's adapter list as the front end would fetch it now."""
    spec = comfy.object_info("LiteVSRAttachAdapter")["LiteVSRAttachAdapter"]["input"]["required"]["adapter"]
    return spec[0] if isinstance(spec[0], list) else spec[1]["options"]


@pytest.fixture(scope="module")
def train_folder(comfy, tmp_path_factory):
    """A folder of one real HR clip (21 frames of bigbuckbunny at 96x64) in the server's input/litevsr_train/."""
    src = demo_tool.make_clip(demo_tool.bigbuckbunny(), tmp_path_factory.mktemp("train") / "bbb.mp4", 21, 96, 64)
    return comfy_server.place_file(src, comfy.base / "input" / TRAIN_FOLDER / "bbb_96x64.mp4").parent


@pytest.fixture(scope="module")
def trained(comfy, train_folder):
    """The first run: 4 steps from a new adapter; {"prompt", "entry", "progress", "seconds", "name"}."""
    assert f"{PREFIX}_00001.safetensors" not in adapter_options(comfy)
    prompt = train_prompt()
    entry, progress, seconds = run_training(comfy, prompt)
    print(f"\n[train e2e] {STEPS} steps: {seconds:.1f} s; node times: "
          + ", ".join(f"{prompt[n]['class_type']} {t:.1f} s" for n, t in comfy.node_seconds.items() if n in prompt))
    return {"prompt": prompt, "entry": entry, "progress": progress, "seconds": seconds,
            "name": saved_name(prompt, entry)}


def test_training_example_saves_adapter_checkpoints_and_loss_graph(comfy, trained):
    # the adapter file under the name the Save node returned, a LiteVSR adapter whose injections were trained
    name = trained["name"]
    assert name == f"{PREFIX}_00001.safetensors", name
    path = comfy.base / "models" / "litevsr" / name
    assert path.is_file(), path
    config, metadata = read_adapter_config(str(path))
    assert (config.mode, config.rank, config.backbone.num_layers) == ("direct", 0, 2)  # the example's, on the tiny DiT
    assert metadata["train_steps"] == str(STEPS)
    assert json.loads(metadata["train_config"])["steps"] == STEPS
    tensors = load_file(str(path))
    ups = {k: v for k, v in tensors.items() if re.fullmatch(r"injections\.\d+\.up\.weight", k)}
    assert ups, sorted(tensors)[:8]
    largest = max(float(v.abs().max()) for v in ups.values())
    print(f"[train e2e] largest |injections.*.up.weight| after {STEPS} steps: {largest:.2e} (zero-init: 0)")
    assert all(float(v.abs().max()) > 0 for v in ups.values())

    # checkpoints every 2 steps, each an adapter file plus the optimizer/loss sidecar
    assert checkpoint_files(comfy) == ["step_00000002.safetensors", "step_00000002.state.safetensors",
                                       "step_00000004.safetensors", "step_00000004.state.safetensors"]
    read_adapter_config(str(checkpoint_dir(comfy) / "step_00000004.safetensors"))
    losses = state_losses(comfy, STEPS)
    assert len(losses) == STEPS and all(np.isfinite(losses)), losses
    assert state_losses(comfy, EVERY) == losses[:EVERY]
    print(f"[train e2e] training losses: {', '.join(f'{v:.4f}' for v in losses)}")

    assert loss_graphs(comfy, trained["prompt"], trained["entry"]) == 2  # training and validation loss
    check_step_progress(trained["progress"], STEPS)


def loss_graphs(comfy, prompt, entry):
    """How many Plot Loss Graph nodes drew their map: each shows its PNG as a preview (ComfyUI's temp/, not
    output/); every one in the prompt must have."""
    graphs = nodes_of(prompt, "LossGraphNode")
    for key, _ in graphs:
        (image,) = entry["outputs"][key]["images"]
        png = comfy.base / image["type"] / image.get("subfolder", "") / image["filename"]
        assert png.suffix == ".png" and png.is_file(), image
        with png.open("rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    return len(graphs)


def check_step_progress(progress, steps):
    """The training node's progress reached the websocket: one update per step, up to the total."""
    values = [line.rsplit(": ", 1)[1] for line in progress if not line.endswith(f": 0/{steps}")]
    assert set(values) == {f"{step}/{steps}" for step in range(1, steps + 1)} and values[-1] == f"{steps}/{steps}", \
        progress


def test_resume_continues_from_the_newest_checkpoint(comfy, trained):
    before = state_losses(comfy, STEPS)
    prompt = train_prompt(resume=True, steps=RESUMED_STEPS)
    entry, progress, seconds = run_training(comfy, prompt)
    print(f"\n[train e2e] resume {STEPS} -> {RESUMED_STEPS} steps: {seconds:.1f} s")
    assert checkpoint_files(comfy) == [f"step_{s:08d}{ext}" for s in (2, 4, 6)
                                       for ext in (".safetensors", ".state.safetensors")]
    losses = state_losses(comfy, RESUMED_STEPS)
    assert len(losses) == RESUMED_STEPS
    assert losses[:STEPS] == before, "the resumed run did not keep the earlier loss history"
    values = [line.rsplit(": ", 1)[1] for line in progress if not line.endswith(f": 0/{RESUMED_STEPS}")]
    assert set(values) == {f"{step}/{RESUMED_STEPS}" for step in range(STEPS + 1, RESUMED_STEPS + 1)}, progress
    # a second save never overwrites the first
    resumed = comfy.base / "models" / "litevsr" / saved_name(prompt, entry)
    assert resumed.name == f"{PREFIX}_00002.safetensors"
    _, metadata = read_adapter_config(str(resumed))
    assert metadata["train_steps"] == str(RESUMED_STEPS)

    # and the resumed run equals an uninterrupted one: same losses, same adapter tensors
    straight = train_prompt(steps=RESUMED_STEPS, run_name=f"{RUN_NAME}_straight")
    entry, _, seconds = run_training(comfy, straight)
    print(f"[train e2e] uninterrupted {RESUMED_STEPS} steps: {seconds:.1f} s")
    straight_losses = state_losses(comfy, RESUMED_STEPS, f"{RUN_NAME}_straight")
    print(f"[train e2e] losses resumed: {losses}; uninterrupted: {straight_losses}")
    assert straight_losses == losses
    a, b = load_file(str(resumed)), load_file(str(comfy.base / "models" / "litevsr" / saved_name(straight, entry)))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def decoded_frames(path):
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]).astype(np.float32) / 255.0


def test_trained_adapter_changes_the_upscale(comfy, trained, test_clip):
    """The point of training: the upscale example with the saved adapter gives a different video than with a new
    (zero-init, output = bare backbone) adapter, far beyond the run-to-run difference (zero-init again). The saved
    file is offered by the Attach node without a restart."""
    name = trained["name"]
    assert name in adapter_options(comfy)
    frames = []
    for adapter, prefix in ((demo_tool.NEW_ADAPTER, "zero"), (name, "trained"), (demo_tool.NEW_ADAPTER, "zero_again")):
        prompt = demo_tool.configure(demo_tool.load_api_workflow(), input_name=TEST_CLIP, scale=SCALE, steps=1,
                                     adapter=adapter, filename_prefix=f"train_e2e/{prefix}")
        t0 = time.monotonic()
        (path,) = comfy.run_prompt(prompt, timeout=300)
        ran = {prompt[n]["class_type"] for n in comfy.node_seconds if n in prompt}
        assert {"LiteVSRAttachAdapter", "LiteVSRSampler", "LiteVSRTiledDecode"} <= ran, ran  # not from the cache
        print(f"\n[train e2e] upscale with {adapter!r}: {time.monotonic() - t0:.1f} s")
        frames.append(decoded_frames(path))
    zero, tuned, zero_again = frames
    assert zero.shape == tuned.shape == zero_again.shape
    diff, floor = float(np.abs(zero - tuned).mean()), float(np.abs(zero - zero_again).mean())
    print(f"[train e2e] mean |trained - zero-init| over {zero.shape} frames: {diff:.4f}; zero-init run to run: "
          f"{floor:.4f} (threshold {MIN_OUTPUT_DIFF})")
    assert floor < MIN_OUTPUT_DIFF / 5
    assert diff > MIN_OUTPUT_DIFF
