"""The sampling math agrees with ComfyUI's own schedule and Euler sampler, and feeds the clean estimate back."""
import pytest
import torch

from comfyui_litevsr.nodes.core.sampling import flow_sigmas, sample_vsr, seeded_noise, shift_sigma, unshift_sigma


@pytest.mark.parametrize("steps,shift", [(1, 5.0), (2, 8.0), (4, 5.0), (7, 3.0)])
def test_schedule_matches_comfyui_simple_scheduler(steps, shift):
    import comfy.model_sampling
    import comfy.samplers

    class FlowSampling(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
        pass

    sampling = FlowSampling(None)
    sampling.set_parameters(shift=shift, multiplier=1000)
    expected = comfy.samplers.calculate_sigmas(sampling, "simple", steps)
    assert torch.allclose(flow_sigmas(steps, shift), expected.float(), atol=2e-3)  # ComfyUI's grid is 1000 steps


def test_partial_schedule_starts_at_the_chosen_sigma():
    sigmas = flow_sigmas(3, 5.0, start_sigma=0.4)
    assert sigmas[0] == pytest.approx(0.4) and sigmas[-1] == 0 and torch.all(sigmas[1:] < sigmas[:-1])
    assert float(shift_sigma(unshift_sigma(0.37, 5.0), 5.0)) == pytest.approx(0.37)


def test_euler_matches_comfyui_sample_euler():
    import comfy.k_diffusion.sampling as kd

    torch.manual_seed(0)
    lr = torch.randn(1, 4, 2, 3, 3)
    noise = torch.randn_like(lr)

    def denoise(x, sigma, lr_latent, estimate):
        return 0.5 * lr_latent + 0.3 * x * (1 - sigma) + 0.1 * torch.sin(x)

    sigmas = flow_sigmas(4, 5.0)
    ours = sample_vsr(denoise, lr, noise, sigmas, start="noise")
    reference = kd.sample_euler(lambda x, s, **kw: denoise(x, float(s[0]), lr, None), noise, sigmas,
                                extra_args={}, disable=True)
    assert torch.allclose(ours, reference, atol=1e-6)


def test_clean_estimate_is_fed_back():
    lr = torch.full((1, 2, 1, 2, 2), 3.0)
    seen = []

    def denoise(x, sigma, lr_latent, estimate):
        seen.append(estimate.clone())
        return estimate + 1.0  # each step's x0 depends on the previous estimate

    out = sample_vsr(denoise, lr, torch.zeros_like(lr), flow_sigmas(3, 5.0))
    assert [float(s.mean()) for s in seen] == [3.0, 4.0, 5.0]  # starts at the LR latent, then the last x0
    assert torch.equal(out, torch.full_like(lr, 6.0))  # the last step lands exactly on x0


def test_lr_start_uses_the_lr_latent_without_noise():
    lr = torch.randn(1, 2, 1, 2, 2)
    first = []
    sample_vsr(lambda x, s, l, e: first.append((x.clone(), s)) or l, lr, torch.randn_like(lr),
               flow_sigmas(1, 5.0, 0.4), start="lr_latent")
    assert torch.equal(first[0][0], lr) and first[0][1] == pytest.approx(0.4)


def test_noise_is_seeded_on_cpu():
    assert torch.equal(seeded_noise((2, 3), 7), seeded_noise((2, 3), 7))
    assert not torch.equal(seeded_noise((2, 3), 7), seeded_noise((2, 3), 8))


def test_known_frames_are_context_and_come_out_unchanged():
    """Carried state: in every call the known frames sit at their context state (c * noise + (1 - c) * known, the
    same at every sigma) and the denoiser is told c on them and the step's sigma elsewhere; the estimate fed back
    and the output hold them exactly; the other frames of a model without temporal interaction are exactly what
    they are without carried state. Both start modes."""
    from comfyui_litevsr.nodes.core.sampling import KnownFrames, video_noise

    lr = torch.randn(1, 2, 5, 2, 2)
    noise = video_noise(lr.shape, seed=3)
    known = KnownFrames((1, 2), torch.randn(1, 2, 2, 2, 2), sigma=0.25)
    memory = torch.randn(1, 2, 3, 2, 2)

    def per_frame(x, sigma, lr_latent, estimate):
        return 0.5 * lr_latent + 0.25 * x * x.abs().clamp(max=1) + 0.1 * estimate

    for start, sigmas in (("noise", flow_sigmas(3, 5.0)), ("lr_latent", flow_sigmas(2, 5.0, 0.4))):
        calls = []

        def recording(x, sigma, lr_latent, estimate, carried):
            calls.append((sigma, x.clone(), estimate.clone(), carried))
            return per_frame(x, sigma, lr_latent, estimate)

        free = sample_vsr(per_frame, lr, noise, sigmas, start)
        carried = sample_vsr(recording, lr, noise, sigmas, start, known=known, memory=memory)
        assert torch.equal(carried[:, :, 1:3], known.values)
        assert torch.equal(carried[:, :, [0, 3, 4]], free[:, :, [0, 3, 4]])
        assert len(calls) == len(sigmas) - 1
        context = 0.25 * noise[:, :, 1:3] + 0.75 * known.values
        for sigma, x, estimate, state in calls:
            assert torch.equal(x[:, :, 1:3], context)  # whatever the step's sigma
            assert torch.equal(estimate[:, :, 1:3], known.values)  # the refinement stream reads them clean
            assert state.frame_sigmas.tolist() == pytest.approx([sigma, 0.25, 0.25, sigma, sigma])
            assert state.memory is memory


def test_memory_alone_is_carried_and_nothing_is_passed_without_carried_state():
    """Memory without known frames (a chunk plan without overlap) reaches the denoiser with no per-frame levels;
    without either, the denoiser is called with its four arguments."""
    from comfyui_litevsr.nodes.core.sampling import video_noise

    lr = torch.randn(1, 2, 3, 2, 2)
    noise = video_noise(lr.shape, seed=1)
    memory = torch.randn(1, 2, 2, 2, 2)
    seen = []
    sample_vsr(lambda x, s, l, e, carried: seen.append(carried) or l, lr, noise, flow_sigmas(2, 5.0), memory=memory)
    assert [(c.frame_sigmas, c.memory) for c in seen] == [(None, memory)] * 2
    sample_vsr(lambda x, s, l, e: l, lr, noise, flow_sigmas(2, 5.0))  # would raise if given a fifth argument


def test_video_noise_is_keyed_by_position():
    from comfyui_litevsr.nodes.core.sampling import video_noise

    whole = video_noise((1, 3, 9, 4, 4), seed=5)
    chunk = video_noise((1, 3, 4, 4, 4), seed=5, first_frame=16)  # latent j <-> pixel 16 + 4j
    assert torch.equal(chunk, whole[:, :, 4:8])
    assert not torch.equal(video_noise((1, 3, 9, 4, 4), seed=6), whole)
