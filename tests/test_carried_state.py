"""Carried state really carries (issue 18, must-show 1): the finished frames reach the DiT as context at every step,
even one step from pure noise, and the per-frame timestep reaches the real (tiny) Wan DiT through ComfyUI."""
from dataclasses import replace

import pytest
import torch

from comfyui_litevsr.nodes.backbone import attach_adapter, backbone_signature, make_denoiser
from comfyui_litevsr.nodes.core.adapter import AdapterConfig, StateAwareAdapter, remember
from comfyui_litevsr.nodes.core.backbones import families, family
from comfyui_litevsr.nodes.core.sampling import Carried, euler_step, flow_sigmas, sample_vsr, video_noise
from comfyui_litevsr.nodes.core.stream import carried_frames
from comfyui_litevsr.nodes.core.temporal import split_chunks
from comfyui_litevsr.nodes.pipeline import adapter_memory, context_sigma

from tools import tiny_models

NEW_TOLERANCE = 0.05  # relative RMS error of the boundary frame: the context noise, 0.02 * |noise - z| at most
OLD_AT_LEAST = 0.5


def copy_previous(x, sigma, lr_latent, estimate, carried=None):
    """A DiT whose x0_hat of frame t is its input's frame t - 1 (frame 0: the LR latent). It ignores the estimate,
    so frame t can only agree with a finished frame t - 1 through what the model input holds there."""
    return torch.cat([lr_latent[:, :, :1], x[:, :, :-1]], dim=2)


def todays_sample(denoise, lr_latent, noise, sigmas, known):
    """The carried state before issue 18, as the reference: the known frames at sigma * noise + (1 - sigma) * known
    in every model input, the DiT told the step's sigma on all frames, Euler steps from noise."""
    index = list(known.frames)

    def impose(x, sigma):
        x = x.clone()
        x[:, :, index] = sigma * noise[:, :, index] + (1 - sigma) * known.values
        return x

    x, estimate = noise, impose(lr_latent, 0.0)
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        estimate = denoise(impose(x, sigma), sigma, lr_latent, estimate)
        x = euler_step(x, estimate, sigma, sigma_next)
    return impose(x, 0.0)


def boundary_error(clean, known):
    """Relative RMS difference between the chunk's first frame after its known frames and the finished frame it
    follows (the previous chunk's latent at the last known frame)."""
    finished = known.values[:, :, -1]
    return float((clean[:, :, known.frames[-1] + 1] - finished).norm() / finished.norm())


@pytest.mark.parametrize("context", sorted({f.context_sigma for f in families()}))
@pytest.mark.parametrize("steps", [1, 4])
def test_the_boundary_frame_follows_the_finished_frames_only_with_the_new_scheme(context, steps):
    chunks = split_chunks(40, 17, 8)
    first, second = chunks[0], chunks[1]
    previous = torch.randn(1, 4, 5, 6, 6, generator=torch.Generator().manual_seed(1))  # the first chunk's result
    known = replace(carried_frames(first, previous, second), sigma=context)
    lr = torch.randn(1, 4, 5, 6, 6, generator=torch.Generator().manual_seed(2))
    noise = video_noise(lr.shape, seed=3, first_frame=second.start)
    sigmas = flow_sigmas(steps, 5.0)

    new = boundary_error(sample_vsr(copy_previous, lr, noise, sigmas, known=known), known)
    old = boundary_error(todays_sample(copy_previous, lr, noise, sigmas, known), known)
    lr_start = boundary_error(sample_vsr(copy_previous, lr, noise, flow_sigmas(steps, 5.0, 0.4), "lr_latent",
                                         known=known), known)
    print(f"\ncontext {context}, {steps} step(s): boundary error new {new:.4f} (lr_latent start {lr_start:.4f}), "
          f"today's {old:.4f}")
    assert known.frames == (1, 2)  # frame 3 is the first the chunk makes after the finished frames
    assert new <= NEW_TOLERANCE and lr_start <= NEW_TOLERANCE
    if context == 0:
        assert new == 0 and lr_start == 0  # clean context: the boundary frame is the finished frame itself
    assert old >= OLD_AT_LEAST


def load_stand_in(tmp_path, family_id):
    import comfy.sd

    # a unit-scale output head (as the training tests use), so the DiT's output is not drowned by x
    path = tiny_models.save_tiny_wan_dit(tmp_path / f"{family_id}.safetensors", dim=128, num_layers=2,
                                         family=family_id, head_std=128 ** -0.5)
    return comfy.sd.load_diffusion_model(str(path))


@pytest.mark.parametrize("family_id, mode", [("wan2.1", "direct"), ("wan2.2", "direct"), ("wan2.1", "shared_blocks")])
def test_per_frame_timesteps_reach_the_dit(tmp_path, family_id, mode):
    """Through ComfyUI's loader, apply_model and our wrapper: with carried frame sigmas the zero-initialised adapter
    (exact identity) gives what a direct DiT call with the per-frame timestep tensor [B, T] gives, not what the
    scalar-timestep call gives; the adapter itself reads the call's sigma and receives the carried memory. In
    shared_blocks mode the condition branch passes the frozen blocks with the same per-frame modulation."""
    import comfy.model_management

    dit = load_stand_in(tmp_path, family_id)
    adapter = StateAwareAdapter(AdapterConfig(backbone_signature(dit), mode=mode))
    seen = []
    features = adapter.features

    def spy(lr_latent, estimate, timestep, memory=None):
        seen.append((timestep.clone(), memory))
        return features(lr_latent, estimate, timestep)

    adapter.features = spy
    context = tiny_models.zero_text_context()
    model = attach_adapter(dit, adapter, context)
    denoise = make_denoiser(model)
    channels = backbone_signature(dit).latent_channels
    generator = torch.Generator().manual_seed(0)
    x, lr, memory = (torch.randn(1, channels, 3, 4, 6, generator=generator) for _ in range(3))
    sigma, level = 0.625, family(family_id).context_sigma
    frame_sigmas = torch.tensor([sigma, level, sigma])

    with torch.no_grad():
        carried = denoise(x, sigma, lr, lr, Carried(frame_sigmas, memory)).float()
        plain = denoise(x, sigma, lr, lr).float()
        comfy.model_management.load_models_gpu([dit])
        base = dit.model
        dtype = base.get_dtype()

        def direct(timestep):
            v = base.diffusion_model(x.to(dtype), timestep, context=context.to(dtype)).float()
            return x - sigma * v  # ComfyUI's flow x0 (CONST.calculate_denoised)

        per_frame = direct(1000 * frame_sigmas[None])
        scalar = direct(torch.tensor([1000 * sigma]))
    assert torch.allclose(plain, scalar, atol=1e-6, rtol=0)  # the identity adapter, no carried state
    assert torch.equal(carried, per_frame)
    moved = (carried[:, :, [0, 2]] - scalar[:, :, [0, 2]]).abs().max().item()
    own = (carried[:, :, 1] - scalar[:, :, 1]).abs().max().item()
    print(f"\n{family_id}: per-frame vs scalar timestep, max |diff| on the unknown frames {moved:.2e}, on the "
          f"known frame {own:.2e}")
    # the unknown frames read the known frame's timestep through attention (same inputs give bit-identical
    # outputs, so any difference is the timestep's; 5e-6 is far above float32 rounding of these O(1) values)
    assert moved > 5e-6 and own > moved
    assert [float(t) for t, _ in seen] == [1000 * sigma] * 2  # the adapter: the call's sigma, both calls
    # what the streaming runner reads off the MODEL: the family's level, the adapter's remember (none: no adapter)
    assert context_sigma(model) == level and adapter_memory(model) is remember and adapter_memory(dit) is None
    assert seen[0][1] is not None and torch.equal(seen[0][1], memory) and seen[1][1] is None
