"""What a training run needs from the ComfyUI it runs in, on every supported version.

- ComfyUI >= 0.13 has `comfy.model_management.in_training`: while it is set, fused inference kernels (comfy-kitchen's
  RoPE in Wan attention, INT8 linears) take their plain, differentiable torch paths. Core's trainer sets it for its
  run; so does this pack, restoring the previous value on any exit.
- ComfyUI 0.8-0.12 call comfy-kitchen's fused RoPE (`torch.ops.comfy_kitchen.apply_rope1`) with no such switch, and
  that op has no backward. RoPE is a fixed 2x2 matrix per channel pair, so its gradient is the same op applied with
  the transposed matrices; that formula is registered as the op's backward (the forward stays the fused kernel, so
  training sees exactly what inference computes). Before any work it is checked against the plain formula; if the
  op does not match, the run is refused with one line that names the ComfyUI version to use.
- ComfyUI 0.3.x has neither kitchen nor the switch: its RoPE is plain torch.
"""
import contextlib
import sys

import torch

import comfy.model_management

MIN_VERSION_FOR_FUSED_KERNELS = "0.13"  # the first ComfyUI with `in_training`


class TrainingUnsupported(RuntimeError):
    pass


@contextlib.contextmanager
def comfy_training_mode():
    """For the duration of a training run: `in_training` set where ComfyUI has it (and restored), else fused RoPE
    made differentiable (or the run refused before any work)."""
    management = comfy.model_management
    if not hasattr(management, "in_training"):
        ensure_differentiable_rope()
        yield
        return
    previous = management.in_training
    management.in_training = True
    try:
        yield
    finally:
        management.in_training = previous


def reference_rope(x, freqs):
    """ComfyUI's plain interleaved RoPE: channel pair k of x times the 2x2 matrix freqs[..., k, :, :]."""
    pairs = x.to(freqs.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    return (freqs[..., 0] * pairs[..., 0] + freqs[..., 1] * pairs[..., 1]).reshape(x.shape).type_as(x)


def _kitchen_ops():
    """torch.ops.comfy_kitchen where comfy-kitchen is loaded (ComfyUI imports it at start-up), else None."""
    if "comfy_kitchen" not in sys.modules:
        return None
    return torch.ops.comfy_kitchen


def rope_error(ops, name):
    """max |error| of fused RoPE op `name`'s outputs and input gradients against the plain formula, on a small case
    shaped like Wan's (batch, tokens, heads, head_dim) with rotation matrices built like ComfyUI's rope()."""
    generator = torch.Generator().manual_seed(0)
    angles = torch.rand(1, 6, 1, 4, generator=generator) * 6.3
    cos, sin = angles.cos(), angles.sin()
    freqs = torch.stack([cos, -sin, sin, cos], dim=-1).reshape(1, 6, 1, 4, 2, 2)
    count = 1 if name == "apply_rope1" else 2
    inputs = [torch.randn(2, 6, 3, 8, generator=generator) for _ in range(count)]
    grads = [torch.randn(2, 6, 3, 8, generator=generator) for _ in range(count)]
    fused_in = [tensor.clone().requires_grad_(True) for tensor in inputs]
    plain_in = [tensor.clone().requires_grad_(True) for tensor in inputs]
    fused = getattr(ops, name)(*fused_in, freqs)
    fused = [fused] if count == 1 else list(fused)
    plain = [reference_rope(tensor, freqs) for tensor in plain_in]
    torch.autograd.backward(fused, grads)
    torch.autograd.backward(plain, grads)
    pairs = zip(fused + [t.grad for t in fused_in], plain + [t.grad for t in plain_in])
    return max(float((a.detach() - b.detach()).abs().max()) for a, b in pairs)


def _transposed(ctx, inputs, output):
    ctx.freqs_t = inputs[-1].transpose(-1, -2).contiguous()


def _rotate_back(ctx, grad):
    """The gradient through RoPE: the same fused op with the transposed matrices (None passes through)."""
    return None if grad is None else torch.ops.comfy_kitchen.apply_rope1(grad.contiguous(), ctx.freqs_t)


def _rope1_backward(ctx, grad):
    return _rotate_back(ctx, grad), None


def _rope_backward(ctx, grad_q, grad_k):
    return _rotate_back(ctx, grad_q), _rotate_back(ctx, grad_k), None


def _refusal(reason):
    return TrainingUnsupported(
        f"Training needs ComfyUI {MIN_VERSION_FOR_FUSED_KERNELS} or newer (update ComfyUI): this one runs Wan "
        f"attention through comfy-kitchen's fused RoPE, which cannot be trained through ({reason}).")


BACKWARDS = {"apply_rope1": _rope1_backward, "apply_rope": _rope_backward}  # the ops Wan/Flux attention call


def ensure_differentiable_rope(tolerance=1e-5):
    """Gives comfy-kitchen's fused RoPE ops an exact backward where they have none (checked before use); raises
    TrainingUnsupported with one line if that is not possible. Idempotent; nothing happens without kitchen."""
    ops = _kitchen_ops()
    if ops is None:
        return
    for name, backward in BACKWARDS.items():
        if not hasattr(ops, name):
            continue  # not in this kitchen: ComfyUI cannot call it either
        try:
            error = rope_error(ops, name)
        except RuntimeError as missing:
            if "autograd" not in str(missing):
                raise _refusal(f"{name} failed: {' '.join(str(missing).split())[:200]}") from missing
            try:
                torch.library.register_autograd(f"comfy_kitchen::{name}", backward, setup_context=_transposed)
                error = rope_error(ops, name)
            except (RuntimeError, AttributeError) as failed:
                raise _refusal(f"no backward could be given to {name}: {' '.join(str(failed).split())[:200]}") \
                    from failed
        if error > tolerance:
            raise _refusal(f"its {name} differs from the plain formula by {error:.2e}")
