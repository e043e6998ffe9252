"""Adapter training on a frozen tiny Wan (loaded by ComfyUI's own loaders) with real bigbuckbunny clips: it converges
on held-out clips (trained for the noise start and for the lr_latent start), only the adapter changes, resume is
exact, a killed checkpoint write loses nothing, and the trained adapter changes the upscale."""
import hashlib
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import REPO
from comfyui_litevsr.nodes.adapters import new_adapter
from comfyui_litevsr.nodes.backbone import attach_adapter, backbone_signature, make_denoiser
from comfyui_litevsr.nodes.core.adapter_file import load_adapter, save_adapter
from comfyui_litevsr.nodes.core.checkpoint import checkpoint_paths, latest_checkpoint, load_checkpoint
from comfyui_litevsr.nodes.core.dataset import VideoClipDataset
from comfyui_litevsr.nodes.core.frames import resize_frames
from comfyui_litevsr.nodes.core.sampling import flow_sigmas, sample_vsr
from comfyui_litevsr.nodes.core.training import TrainConfig
from comfyui_litevsr.nodes.core.video_io import VideoReader, VideoWriter
from comfyui_litevsr.nodes.pipeline import lr_encoder
from comfyui_litevsr.nodes.training_run import Hooks, RunSettings, train_adapter
from tools import demo as demo_tool
from tools import tiny_models

CLIP_FRAMES, CROP, SCALE = 5, (64, 64), 4
TRAIN_DIM = 128  # the stand-in's output head at fan-in scale (tiny_models: head_std) so an adapter can steer it


def write_segment(path, first, count, width=128, height=72):
    reader = VideoReader(demo_tool.bigbuckbunny())
    with VideoWriter(path, reader.fps, width, height) as writer:
        writer.write(resize_frames(reader.frames(first, count), height, width))
    return path


@pytest.fixture(scope="module")
def clip_folders(tmp_path_factory):
    """Training clips from bigbuckbunny frames 0-99, held-out validation clips from frames 100-131."""
    root = tmp_path_factory.mktemp("training_clips")
    (root / "train").mkdir()
    (root / "val").mkdir()
    write_segment(root / "train" / "bbb_0_99.mp4", 0, 100)
    write_segment(root / "val" / "bbb_100_131.mp4", 100, 32)
    return root / "train", root / "val"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import comfy.sd
    import comfy.utils

    folder = tmp_path_factory.mktemp("train_models")
    dit = tiny_models.save_tiny_wan_dit(folder / "dit.safetensors", dim=TRAIN_DIM, num_layers=2,
                                        head_std=TRAIN_DIM ** -0.5)
    vae = tiny_models.save_tiny_wan21_vae(folder / "vae.safetensors", dim=8)
    return comfy.sd.load_diffusion_model(str(dit)), comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(vae)))


def datasets(clip_folders):
    train, val = clip_folders
    return VideoClipDataset(train, CLIP_FRAMES, CROP, seed=0), VideoClipDataset(val, CLIP_FRAMES, CROP, seed=0)


def tensor_digest(module):
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def fresh(model, mode="direct", rank=0):
    return new_adapter(backbone_signature(model), mode, rank, seed=0)


def train(models, clip_folders, config, settings=None, adapter=None):
    """As the Train node runs it: under inference mode, with the stock-loaded MODEL and VAE."""
    model, vae = models
    train_set, val_set = datasets(clip_folders)
    with torch.inference_mode():
        return train_adapter(model, vae, train_set, "light", SCALE, config, adapter or fresh(model), None,
                             settings or RunSettings(), val_set)


@pytest.fixture(scope="module")
def converged(models, clip_folders):
    model, vae = models
    before = (tensor_digest(model.model), tensor_digest(vae.first_stage_model))
    config = TrainConfig(steps=200, learning_rate=1e-3, max_unrolls=3, seed=0)
    result = train(models, clip_folders, config, RunSettings(validation_clips=2, validation_every=100,
                                                              gradient_checkpointing=True))
    after = (tensor_digest(model.model), tensor_digest(vae.first_stage_model))
    return result, before, after


@pytest.mark.slow
def test_200_steps_bring_held_out_validation_loss_below_0_6x(converged):
    result, _, _ = converged
    (first_step, initial), *_, (last_step, final) = result.validation
    ratio = final / initial
    print(f"\n[convergence] held-out validation loss (bigbuckbunny frames 100-131, 2 clips x 4 sigmas): "
          f"step {first_step} {initial:.4f} -> step {last_step} {final:.4f}, ratio {ratio:.3f}; "
          f"validations {[(s, round(v, 4)) for s, v in result.validation]}")
    assert (first_step, last_step) == (0, 200) and len(result.losses) == 200
    assert ratio <= 0.6


@pytest.mark.slow
def test_lr_latent_start_trains_below_0_6x(models, clip_folders):
    """Trained for the sampler's lr_latent start (the LR latent as the state at sigma 0.4, training sigmas drawn
    below it), 200 steps bring the held-out loss (sigmas 0.1-0.4) to at most 0.6x its start."""
    config = TrainConfig(steps=200, learning_rate=1e-3, max_unrolls=3, seed=0, start="lr_latent")
    result = train(models, clip_folders, config, RunSettings(validation_clips=2, validation_every=100,
                                                              gradient_checkpointing=True))
    (first_step, initial), *_, (last_step, final) = result.validation
    ratio = final / initial
    print(f"\n[convergence, start lr_latent at {config.start_sigma}] held-out validation loss: step {first_step} "
          f"{initial:.4f} -> step {last_step} {final:.4f}, ratio {ratio:.3f}; "
          f"validations {[(s, round(v, 4)) for s, v in result.validation]}")
    assert (first_step, last_step) == (0, 200)
    assert ratio <= 0.6


def test_only_the_adapter_learns(converged, models):
    result, before, after = converged
    assert before == after  # every DiT and VAE tensor, bit for bit
    model, _ = models
    assert not any(p.requires_grad for p in model.model.parameters())
    untrained = fresh(model).state_dict()
    changed = [name for name, tensor in result.adapter.state_dict().items() if not torch.equal(tensor, untrained[name])]
    assert any(name.startswith("injections.") for name in changed) and len(changed) > len(untrained) // 2


def test_trained_adapter_file_changes_the_upscale(converged, models, clip_folders, tmp_path):
    """Saved, reloaded and attached as the inference graph does, the trained adapter moves the one-step upscale of
    a held-out clip toward the HR latent; the zero-init adapter leaves the bare backbone's output."""
    result, _, _ = converged
    model, vae = models
    path = save_adapter(tmp_path / "trained.safetensors", result.adapter, result.context)
    loaded, context = load_adapter(str(path), backbone_signature(model))
    _, val_set = datasets(clip_folders)
    hr = val_set.sample(0)
    lr = resize_frames(resize_frames(hr, CROP[0] // SCALE, CROP[1] // SCALE), *CROP)
    encode = lr_encoder(vae, model)
    with torch.no_grad():
        hr_latent, lr_latent = encode(hr), encode(lr)
    noise = torch.randn(lr_latent.shape, generator=torch.Generator().manual_seed(5))
    outputs = {}
    with torch.inference_mode():
        for name, adapter in (("zero-init", fresh(model)), ("trained", loaded)):
            denoise = make_denoiser(attach_adapter(model, adapter, context))
            outputs[name] = sample_vsr(denoise, lr_latent, noise, flow_sigmas(1, 5.0))
    change = float((outputs["trained"] - outputs["zero-init"]).abs().mean())
    errors = {name: float((out - hr_latent).pow(2).mean()) for name, out in outputs.items()}
    print(f"\n[inference] mean |trained - zero-init| {change:.4f}; latent MSE to HR {errors}")
    assert change > 0.1
    assert errors["trained"] < 0.5 * errors["zero-init"]


@pytest.mark.slow
def test_resume_is_exact(models, clip_folders, tmp_path):
    """20 straight steps == 10 steps, checkpoint, resume, 10 more (same seed), on every adapter tensor."""
    config = TrainConfig(steps=20, learning_rate=1e-3, grad_accumulation=2, max_unrolls=3, seed=3)
    straight = train(models, clip_folders, config)
    folder = tmp_path / "run"
    first = train(models, clip_folders, TrainConfig(**{**config.to_dict(), "steps": 10}),
                  RunSettings(checkpoint_dir=str(folder), checkpoint_every=5))
    assert latest_checkpoint(folder) == 10 and first.resumed_from is None
    resumed = train(models, clip_folders, config, RunSettings(checkpoint_dir=str(folder), resume=True))
    assert resumed.resumed_from == 10 and latest_checkpoint(folder) == 20
    worst = max(float((a - b).abs().max()) for a, b in zip(straight.adapter.state_dict().values(),
                                                          resumed.adapter.state_dict().values()))
    print(f"\n[resume] max |straight - resumed| over adapter tensors: {worst:.3g}")
    assert worst <= 1e-6
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-6)
    assert any(name != "losses" for name in load_checkpoint(folder, 20)[2])  # optimizer moments are stored


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    from tools import comfy_env; comfy_env.setup()
    import comfy.sd, comfy.utils, torch
    from safetensors.torch import save
    import comfyui_litevsr.nodes.core.adapter_file as adapter_file
    from comfyui_litevsr.nodes.core.dataset import VideoClipDataset
    from comfyui_litevsr.nodes.core.training import TrainConfig
    from comfyui_litevsr.nodes.adapters import new_adapter
    from comfyui_litevsr.nodes.backbone import backbone_signature
    from comfyui_litevsr.nodes.training_run import Hooks, RunSettings, train_adapter

    writes = []
    def dying_save_file(tensors, path, metadata=None):
        writes.append(path)
        if len(writes) == {kill_at}:  # half the bytes on disk, then the process is killed outright
            data = save(tensors, metadata=metadata)
            with open(path, "wb") as handle:
                handle.write(data[: len(data) // 2])
                handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save_file(tensors, path, metadata=metadata)
    real_save_file = adapter_file.save_file
    adapter_file.save_file = dying_save_file

    model = comfy.sd.load_diffusion_model({dit!r})
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file({vae!r}))
    data = VideoClipDataset({data!r}, 5, 64, seed=0)
    with torch.inference_mode():
        train_adapter(model, vae, data, "light", 4, TrainConfig(steps=4, learning_rate=1e-3, seed=1),
                      new_adapter(backbone_signature(model), "direct", 0), None,
                      RunSettings(checkpoint_dir={folder!r}, checkpoint_every=2))
    print("not killed")
""")


@pytest.mark.parametrize("kill_at,what", [(3, "state sidecar"), (4, "adapter file")])
@pytest.mark.matrix("Training", "kill -9 mid-run then resume")
@pytest.mark.matrix("Runs", "interrupt during training checkpoint write")
def test_killed_checkpoint_write_leaves_the_previous_checkpoint(models, clip_folders, tmp_path, kill_at, what):
    """Checkpoint 2 writes files 1-2 (sidecar, adapter); the process is SIGKILLed halfway through file `kill_at`
    (checkpoint 4's sidecar or adapter). Checkpoint 2 stays the newest complete one, loads, and resumes."""
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    dit = tiny_models.save_tiny_wan_dit(model_dir / "dit.safetensors", dim=TRAIN_DIM, num_layers=2,
                                        head_std=TRAIN_DIM ** -0.5)
    vae = tiny_models.save_tiny_wan21_vae(model_dir / "vae.safetensors", dim=8)
    folder = tmp_path / "run"
    script = KILLED_RUN.format(kill_at=kill_at, dit=str(dit), vae=str(vae),
                               data=str(clip_folders[0]), folder=str(folder))
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stdout[-2000:] + done.stderr[-2000:]  # really killed, mid-write
    leftovers = sorted(p.name for p in folder.iterdir())
    print(f"\n[killed during checkpoint 4's {what}] files: {leftovers}")
    assert any(name.startswith(".litevsr-") for name in leftovers)  # the half-written temporary file
    assert latest_checkpoint(folder) == 2
    assert not checkpoint_paths(folder, 4)[0].exists()
    adapter, _, tensors, state, _ = load_checkpoint(folder, 2, backbone_signature(models[0]))
    assert state["step"] == 2 and len(tensors["losses"]) == 2
    resumed = train(models, clip_folders, TrainConfig(steps=4, learning_rate=1e-3, seed=1),
                    RunSettings(checkpoint_dir=str(folder), resume=True))
    assert resumed.resumed_from == 2 and latest_checkpoint(folder) == 4 and len(resumed.losses) == 4
    # the next complete checkpoint removed the killed write's leftovers
    expected = [path.name for step in (2, 4) for path in checkpoint_paths(folder, step)]
    assert sorted(p.name for p in folder.iterdir()) == sorted(expected)


class InterruptAt(Hooks):
    def __init__(self, step):
        self.step, self.seen = step, 0

    def on_step(self, step, total, loss):
        self.seen = step

    def check_interrupt(self):
        if self.seen == self.step:
            raise KeyboardInterrupt("stand-in for ComfyUI's InterruptProcessingException")


@pytest.mark.matrix("Runs", "interrupt during training checkpoint write")
def test_interrupt_checkpoints_the_finished_steps(models, clip_folders, tmp_path):
    model, vae = models
    train_set, _ = datasets(clip_folders)
    config = TrainConfig(steps=5, learning_rate=1e-3, seed=6)
    with torch.inference_mode(), pytest.raises(KeyboardInterrupt):
        train_adapter(model, vae, train_set, "light", SCALE, config, fresh(model), None,
                      RunSettings(checkpoint_dir=str(tmp_path)), hooks=InterruptAt(3))
    assert latest_checkpoint(tmp_path) == 3  # checkpoint_every 0: only the interrupt wrote one


def test_gradient_checkpointing_gives_the_same_update(models, clip_folders):
    config = TrainConfig(steps=2, learning_rate=1e-3, max_unrolls=2, seed=4)
    plain = train(models, clip_folders, config, RunSettings(gradient_checkpointing=False))
    recomputed = train(models, clip_folders, config, RunSettings(gradient_checkpointing=True))
    for (name, a), b in zip(plain.adapter.state_dict().items(), recomputed.adapter.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name
    assert plain.losses == pytest.approx(recomputed.losses, rel=1e-6)


def test_shared_blocks_low_rank_adapter_trains(models, clip_folders):
    model, _ = models
    start = fresh(model, "shared_blocks", rank=8)
    result = train(models, clip_folders, TrainConfig(steps=2, learning_rate=1e-3, seed=2), adapter=start)
    up = result.adapter.injections[0].up.weight
    assert result.adapter.config.mode == "shared_blocks" and result.adapter.injections[0].down is not None
    assert up.abs().max() > 0 and start.injections[0].up.weight.abs().max() == 0  # the input adapter is untouched


def test_two_segment_training_trains_the_memory_of_earlier_chunks(models, clip_folders):
    """segments = 2 on the real stand-ins (9-frame clips: 3 latent frames, the second segment shares 1): the
    memory's zero-initialised projections move off zero, so the memory is trained, and the losses stay finite;
    one-segment training leaves them at zero (no memory reaches the adapter there)."""
    model, vae = models
    start = fresh(model)

    def run(segments):
        config = TrainConfig(steps=3, learning_rate=1e-3, max_unrolls=2, seed=1, segments=segments,
                             segment_overlap=1)
        with torch.inference_mode():
            return train_adapter(model, vae, VideoClipDataset(clip_folders[0], 9, CROP, seed=0), "light", SCALE,
                                 config, start, None, RunSettings(validation_clips=1),
                                 VideoClipDataset(clip_folders[1], 9, CROP, seed=0))

    two, one = run(2), run(1)
    assert start.config.memory and all(out.weight.abs().max() == 0 for out in start.memory.out)
    assert all(out.weight.abs().max() > 0 for out in two.adapter.memory.out)
    assert all(out.weight.abs().max() == 0 for out in one.adapter.memory.out)
    assert all(math.isfinite(loss) for loss in two.losses + [loss for _, loss in two.validation])
