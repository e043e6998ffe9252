"""Training on every ComfyUI in the matrix: `in_training` set for the run and restored on any exit (ComfyUI >= 0.13),
comfy-kitchen's fused RoPE given an exact backward where there is no such switch (0.8-0.12), the backbone held as
core's trainer holds it (a deep copy where the loader can reload it), and the refusal line where nothing works."""
import inspect

import pytest
import torch

import comfy.model_management
from comfyui_litevsr.nodes import training_mode
from comfyui_litevsr.nodes.core.training import TrainConfig
from comfyui_litevsr.nodes.training_run import Hooks, RunSettings, train_adapter
from test_training import SCALE, datasets, fresh, models, clip_folders  # noqa: F401  (module fixtures)

HAS_SWITCH = hasattr(comfy.model_management, "in_training")


class Recorder(Hooks):
    """Records ComfyUI's training switch at every step; optionally interrupts after `stop_at`."""

    def __init__(self, stop_at=None):
        self.seen, self.stop_at = [], stop_at

    def on_step(self, step, total, loss):
        self.seen.append(getattr(comfy.model_management, "in_training", "absent"))

    def check_interrupt(self):
        if self.stop_at is not None and len(self.seen) >= self.stop_at:
            raise KeyboardInterrupt("stand-in for ComfyUI's InterruptProcessingException")


def run(models, clip_folders, steps, hooks):
    model, vae = models
    train_set, _ = datasets(clip_folders)
    with torch.inference_mode():
        return train_adapter(model, vae, train_set, "light", SCALE, TrainConfig(steps=steps, learning_rate=1e-3,
                                                                                seed=3),
                             fresh(model), None, RunSettings(), hooks=hooks)


def test_training_switch_is_on_for_the_run_and_restored_after_success_and_interrupt(models, clip_folders):
    result = run(models, clip_folders, 2, recorder := Recorder())
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    if not HAS_SWITCH:  # 0.3.x and 0.8-0.12: nothing to set, and nothing is invented
        assert recorder.seen == ["absent", "absent"] and not hasattr(comfy.model_management, "in_training")
        return
    assert recorder.seen == [True, True] and comfy.model_management.in_training is False
    with pytest.raises(KeyboardInterrupt):
        run(models, clip_folders, 5, interrupted := Recorder(stop_at=1))
    assert interrupted.seen == [True] and comfy.model_management.in_training is False


def test_training_switch_keeps_a_value_set_by_someone_else(models, clip_folders):
    if not HAS_SWITCH:
        pytest.skip("this ComfyUI has no comfy.model_management.in_training (added in 0.13)")
    comfy.model_management.in_training = True  # e.g. core's own trainer running around us
    try:
        with training_mode.comfy_training_mode():
            assert comfy.model_management.in_training is True
        assert comfy.model_management.in_training is True
    finally:
        comfy.model_management.in_training = False


def plain_rope(x, angles):
    """Independent formula: each channel pair (a, b) rotated by its angle."""
    a, b = x[..., 0::2], x[..., 1::2]
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


def test_fused_rope_trains_exactly_like_the_plain_formula():
    """Where comfy-kitchen is loaded, its fused RoPE (what Wan attention calls on 0.8+) gets gradients equal to the
    plain formula's at a Wan-like shape (batch, tokens, heads, head_dim 128)."""
    if "comfy_kitchen" not in __import__("sys").modules:
        pytest.skip("this ComfyUI has no comfy-kitchen (0.3.x): its RoPE is plain torch")
    training_mode.ensure_differentiable_rope()
    generator = torch.Generator().manual_seed(1)
    angles = torch.rand(1, 40, 1, 64, generator=generator) * 6.3
    freqs = torch.stack([angles.cos(), -angles.sin(), angles.sin(), angles.cos()], dim=-1).reshape(1, 40, 1, 64, 2, 2)
    x = torch.randn(2, 40, 2, 128, generator=generator)
    grad = torch.randn(x.shape, generator=generator)
    fused_x, plain_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    fused = torch.ops.comfy_kitchen.apply_rope1(fused_x, freqs)
    plain = plain_rope(plain_x, angles)
    fused.backward(grad)
    plain.backward(grad)
    assert torch.allclose(fused, plain, atol=1e-5) and torch.allclose(fused_x.grad, plain_x.grad, atol=1e-5)
    print(f"\n[rope] max |grad fused - plain| {float((fused_x.grad - plain_x.grad).abs().max()):.2e}")


def test_unfixable_fused_rope_is_refused_with_one_line_naming_the_version(monkeypatch):
    if "comfy_kitchen" not in __import__("sys").modules:
        pytest.skip("this ComfyUI has no comfy-kitchen (0.3.x): nothing to refuse")
    monkeypatch.setattr(training_mode, "rope_error", lambda ops, name: 0.5)  # a kitchen whose op is not plain RoPE
    with pytest.raises(training_mode.TrainingUnsupported) as refused:
        training_mode.ensure_differentiable_rope()
    message = str(refused.value)
    assert "\n" not in message and "ComfyUI 0.13 or newer" in message and "5.00e-01" in message


def test_the_callers_model_is_never_touched(models, clip_folders):
    """Where ComfyUI can reload the model (force_deepcopy, as core's trainer does), training runs on that copy: the
    MODEL other nodes hold keeps its very tensor objects. Everywhere, the returned MODEL is a clone of the
    caller's with the trained adapter attached, not a second copy of the weights."""
    model, _ = models
    before = dict(model.model.diffusion_model.named_parameters())
    result = run(models, clip_folders, 1, Hooks())
    assert result.model.model is model.model and result.model is not model
    if "force_deepcopy" not in inspect.signature(model.clone).parameters:
        pytest.skip("this ComfyUI cannot reload a MODEL (no clone(force_deepcopy)): training thaws a clone")
    after = dict(model.model.diffusion_model.named_parameters())
    assert all(after[name] is tensor for name, tensor in before.items())
