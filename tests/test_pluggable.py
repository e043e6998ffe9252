"""A new stepper and a new training objective plug in from this file alone: Heun's method runs through
`sample_vsr` with the state feedback and carried frames, and a plain x0 loss trains through `AdapterTrainer`."""
import torch

from comfyui_litevsr.nodes.backbone import attach_adapter, backbone_signature, make_denoiser
from comfyui_litevsr.nodes.core.adapter import AdapterConfig, StateAwareAdapter
from comfyui_litevsr.nodes.core.sampling import KnownFrames, flow_sigmas, sample_vsr, seeded_noise
from comfyui_litevsr.nodes.core.training import (AdapterTrainer, TrainConfig, TrainingSample, unrolled_denoise,
                                                  validation_loss)

from tools import tiny_models


def sample_heun(model, x, sigmas, callback=None):
    """k-diffusion's sample_heun without churn: an Euler predictor to sigma_next corrected by the slope there;
    the last step (to sigma 0) is plain Euler."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigma)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        slope = (x - denoised) / sigma
        predicted = x + (sigma_next - sigma) * slope
        if sigma_next == 0:
            x = predicted
        else:
            corrected = (predicted - model(predicted, sigma_next)) / sigma_next
            x = x + (sigma_next - sigma) * (slope + corrected) / 2
    return x


class Recorder:
    def __init__(self, denoise):
        self.denoise, self.calls = denoise, []

    def __call__(self, x, sigma, lr_latent, estimate, *carried):
        x0 = self.denoise(x, sigma, lr_latent, estimate, *carried)
        self.calls.append((sigma, x.clone(), estimate.clone(), x0.clone()))
        return x0


def assert_fed_back(calls, known):
    """Every call (the corrector's too) reads the previous call's x0, which holds the known values on their frames."""
    for (_, _, estimate, _), (_, _, _, previous) in zip(calls[1:], calls):
        assert torch.equal(estimate, known.put(previous, known.values))


def test_heun_stepper_with_feedback_and_carried_frames_matches_the_hand_computation():
    """x0_hat = estimate / 2 + x / 4 per element, noise 1, LR 2, sigmas 1 -> 1/2 -> 0: every value is dyadic, so
    the hand computation is exact. Frame 1 is carried at context level 1/2; the others never read it (the model is
    per element)."""
    lr, noise = torch.full((1, 1, 3, 1, 1), 2.0), torch.ones(1, 1, 3, 1, 1)
    known = KnownFrames((1,), torch.full((1, 1, 1, 1, 1), 3.0), sigma=0.5)
    frame_sigmas = []

    def model(x, sigma, lr_latent, estimate, carried):
        frame_sigmas.append(carried.frame_sigmas.tolist())
        return estimate / 2 + x / 4

    denoise = Recorder(model)
    steps = []
    out = sample_vsr(denoise, lr, noise, torch.tensor([1.0, 0.5, 0.0]), on_step=lambda *a: steps.append(a),
                     known=known, stepper=sample_heun)

    first = 2 / 2 + 1 / 4  # estimate = LR latent
    predicted = 1 + (0.5 - 1) * (1 - first)
    second = first / 2 + predicted / 4  # the corrector call reads the predictor's estimate
    x = 1 + (0.5 - 1) * ((1 - first) + (predicted - second) / 0.5) / 2
    last = second / 2 + x / 4  # Euler to sigma 0 lands on it
    assert torch.equal(out[:, :, [0, 2]], torch.full((1, 1, 2, 1, 1), last))
    assert torch.equal(out[:, :, [1]], known.values)
    assert steps == [(1, 2), (2, 2)]  # once per step, not once per model call

    sigmas = [sigma for sigma, *_ in denoise.calls]
    assert sigmas == [1.0, 0.5, 0.5]
    assert frame_sigmas == [[1.0, 0.5, 1.0], [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]  # the carried frame: always 1/2
    assert_fed_back(denoise.calls, known)
    assert torch.equal(denoise.calls[0][2], known.put(lr, known.values))
    for _, x_in, _, _ in denoise.calls:  # the carried frame sits at its context state in every model input
        assert torch.equal(x_in[:, :, [1]], torch.full((1, 1, 1, 1, 1), 0.5 * 1 + 0.5 * 3.0))


def test_heun_stepper_on_the_real_tiny_dit(tiny_dit):
    adapter = StateAwareAdapter(AdapterConfig(backbone_signature(tiny_dit)))
    denoise = Recorder(make_denoiser(attach_adapter(tiny_dit, adapter, tiny_models.zero_text_context())))
    lr = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = seeded_noise(lr.shape, 1)
    known = KnownFrames((0,), torch.randn(1, 16, 1, 8, 8, generator=torch.Generator().manual_seed(2)))
    sigmas = flow_sigmas(3, 5.0)
    with torch.no_grad():
        heun = sample_vsr(denoise, lr, noise, sigmas, known=known, stepper=sample_heun).float()
        euler = sample_vsr(denoise.denoise, lr, noise, sigmas, known=known).float()
    assert len(denoise.calls) == 5  # two calls on each step but the last
    assert torch.equal(heun[:, :, [0]], known.values)
    assert torch.isfinite(heun).all() and not torch.allclose(heun[:, :, 1:], euler[:, :, 1:])
    assert_fed_back(denoise.calls, known)


class Pairs:
    """Training pairs without a VAE: HR = 0.5 LR + 0.2, one seeded draw per sample index."""

    def batch(self, indices):
        generators = [torch.Generator().manual_seed(index) for index in indices]
        lr, noise = (torch.cat([torch.randn(1, 2, 2, 4, 4, generator=g) for g in generators]) for _ in range(2))
        return TrainingSample(0.5 * lr + 0.2, lr, noise, torch.cat([torch.rand(1, generator=g) for g in generators]))


def test_x0_objective_trains_the_adapter():
    calls = []

    def x0_loss(denoise, hr_latent, lr_latent, noise, sigma, config):
        calls.append(sigma)
        predicted = unrolled_denoise(denoise, hr_latent, lr_latent, noise, sigma, config)
        return (predicted - hr_latent).pow(2).flatten(1).mean(dim=1)

    torch.manual_seed(0)
    adapter = torch.nn.Conv3d(4, 2, 1)

    def denoise(x, sigma, lr_latent, estimate):
        return adapter(torch.cat([x, lr_latent], dim=1))

    config = TrainConfig(steps=40, learning_rate=0.02, batch_size=2)
    pairs = Pairs()
    held_out = [pairs.batch([1000 + i]) for i in range(4)]
    before = validation_loss(denoise, held_out, config, "cpu", objective=x0_loss)
    trainer = AdapterTrainer(adapter, denoise, pairs, config, objective=x0_loss)
    first = pairs.batch([0, 1])
    with torch.no_grad():
        expected = x0_loss(denoise, first.hr_latent, first.lr_latent, first.noise, first.sigma, config).mean()
    calls.clear()
    losses = [trainer.step() for _ in range(config.steps)]
    assert len(calls) == config.steps  # the trainer called this objective, once per forward pass
    after = validation_loss(denoise, held_out, config, "cpu", objective=x0_loss)
    assert abs(losses[0] - float(expected)) < 1e-6  # and optimised its value, not the velocity loss
    assert after < 0.2 * before and losses[-1] < losses[0]
