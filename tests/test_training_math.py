"""The training objective's pieces, without ComfyUI: timestep sampling, the adaptive unrolling schedule, the loss
weighting on the clean-latent error, the unrolls along the inference trajectory, and the sample layout across
processes."""
import pytest
import torch

from comfyui_litevsr.nodes.core.degrade import DegradationConfig, with_overrides
from comfyui_litevsr.nodes.core.adapter import remember
from comfyui_litevsr.nodes.core.sampling import (Carried, KnownFrames, flow_sigmas, sample_vsr, shift_sigma,
                                                  unshift_sigma)
from comfyui_litevsr.nodes.core.training import (SIGMA_MIN, SegmentCarry, TrainConfig, global_indices, loss_weight,
                                                  sample_sigma, two_segments, unroll_count, unroll_sigmas,
                                                  velocity_loss)


def test_unroll_schedule_matches_the_method_table():
    """The LiteVSR paper's adaptive unrolling schedule: M(t) for s = 5 at t = 0.95, 0.8, 0.5, 0.2, 0."""
    t = torch.tensor([0.95, 0.8, 0.5, 0.2, 0.0])
    assert unroll_count(t, 2).tolist() == [1, 2, 2, 2, 2]
    assert unroll_count(t, 3).tolist() == [1, 2, 3, 3, 3]
    assert unroll_count(t, 4).tolist() == [2, 3, 4, 4, 4]
    assert unroll_count(t, 1).tolist() == [1] * 5


@pytest.mark.parametrize("method,expected_mean", [("uniform", 0.5), ("logit_normal", 0.5), ("shifted", None)])
def test_timestep_sampling(method, expected_mean):
    sigma = sample_sigma(TrainConfig(timestep_sampling=method), torch.Generator().manual_seed(0), 20000)
    assert sigma.min() >= SIGMA_MIN and sigma.max() <= 1.0
    if expected_mean is not None:
        assert abs(float(sigma.mean()) - expected_mean) < 0.01
    else:  # shift 5 pushes toward high noise: median sigma(u = 0.5) = 5 * 0.5 / 3 = 0.833
        assert abs(float(sigma.median()) - 5 / 6) < 0.01
    if method == "logit_normal":  # concentrated in the middle compared with uniform
        assert float(((sigma > 0.25) & (sigma < 0.75)).float().mean()) > 0.6


@pytest.mark.parametrize("method", ["uniform", "logit_normal", "shifted"])
def test_lr_latent_start_draws_the_timestep_distribution_below_its_start_sigma(method):
    """Training for start = lr_latent at 0.4 draws sigma from the same distribution conditioned on sigma <= 0.4:
    its median is the distribution's quantile at half its mass below 0.4."""
    config = TrainConfig(timestep_sampling=method, start="lr_latent", start_sigma=0.4)
    sigma = sample_sigma(config, torch.Generator().manual_seed(0), 20000)
    assert sigma.min() >= SIGMA_MIN and sigma.max() <= 0.4
    full = sample_sigma(TrainConfig(timestep_sampling=method), torch.Generator().manual_seed(1), 200000)
    below = full[full <= 0.4]
    assert abs(float(sigma.median()) - float(below.median())) < 0.01


def test_loss_weight_is_clamped_sigma_minus_two():
    sigma = torch.tensor([1.0, 0.5, 0.1, 0.01])
    assert loss_weight(sigma, TrainConfig(max_loss_weight=50)).tolist() == pytest.approx([1, 4, 50, 50])
    assert loss_weight(sigma, TrainConfig(loss_weighting="none")).tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize("start", ["noise", "lr_latent"])
@pytest.mark.parametrize("weighting,max_weight,expected", [
    ("litevsr", 100.0, lambda s: min(s ** -2, 100.0)), ("litevsr", 10.0, lambda s: min(s ** -2, 10.0)),
    ("none", 100.0, lambda s: 1.0)])
def test_effective_weight_on_the_clean_latent_error(start, weighting, max_weight, expected):
    """A denoiser off the HR latent by delta: loss / mean(delta^2) is w(sigma) exactly (sigma^-2, clamped, or 1),
    whatever the unrolls did before the trained call. sigma 0.05 and 0.2 lie past the clamp at 100 and at 10."""
    gen = torch.Generator().manual_seed(1)
    hr, lr, noise, delta = (torch.randn(5, 4, 2, 4, 4, generator=gen) for _ in range(4))
    config = TrainConfig(max_unrolls=3, loss_weighting=weighting, max_loss_weight=max_weight, start=start)
    sigma = torch.tensor([1.0, 0.9, 0.5, 0.2, 0.05]) * config.first_sigma
    loss = velocity_loss(lambda x, s, lr, estimate: hr + delta, hr, lr, noise, sigma, config)
    effective = loss / delta.pow(2).flatten(1).mean(dim=1)
    assert effective.tolist() == pytest.approx([expected(float(s)) for s in sigma], rel=1e-5)
    assert velocity_loss(lambda x, s, lr, estimate: hr, hr, lr, noise, sigma, config).abs().max() == 0


class Trajectory:
    """A deterministic denoiser whose clean estimate depends on the state, sigma, the LR latent and the estimate it is
    shown (like a DiT with the adapter); records (state, sigma per sample, estimate) of every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, lr, estimate):
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1, 1).expand(x.shape[0], 1, 1, 1, 1)
        self.calls.append((x.clone(), s.flatten().clone(), estimate.clone()))
        return x - s * torch.tanh(x + 0.5 * estimate - lr)


TOLERANCE = 1e-6  # float32 states of unit scale; the two sides differ only in how the sigma arithmetic rounds


@pytest.mark.parametrize("start,start_sigma,grid", [
    ("noise", 1.0, [(4, 2), (3, 1), (2, 0)]),  # (N, k): sigma = flow_sigmas(N)[k], M(sigma) = k + 1 calls
    ("lr_latent", 0.4, [(5, 3), (4, 2), (6, 1), (2, 0)])])
def test_unrolls_feed_back_what_the_sampler_feeds_back(start, start_sigma, grid):
    """One batch, a sigma and an M per sample. Sample b trains at sigma = flow_sigmas(N_b, 5, start)[k_b] with
    M = k_b + 1 calls; those calls are the first k_b + 1 calls of sample_vsr over flow_sigmas(N_b, 5, start) for
    that sample: the same states, sigmas and fed-back estimates (within TOLERANCE)."""
    gen = torch.Generator().manual_seed(3)
    hr, lr, noise = (torch.randn(len(grid), 4, 2, 4, 4, generator=gen) for _ in range(3))
    config = TrainConfig(max_unrolls=4, start=start, start_sigma=start_sigma)
    schedules = [flow_sigmas(steps, config.shift, config.first_sigma) for steps, _ in grid]
    sigma = torch.stack([schedule[k] for schedule, (_, k) in zip(schedules, grid)])
    assert unroll_count(sigma / config.first_sigma, config.max_unrolls).tolist() == [k + 1 for _, k in grid]
    trainer = Trajectory()
    velocity_loss(trainer, hr, lr, noise, sigma, config)
    assert len(trainer.calls) == max(k for _, k in grid) + 1
    worst = 0.0
    for b, (schedule, (_, k)) in enumerate(zip(schedules, grid)):
        sampler = Trajectory()
        sample_vsr(sampler, lr[b:b + 1], noise[b:b + 1], schedule, start)
        for trained, sampled in zip(trainer.calls[-(k + 1):], sampler.calls[:k + 1]):
            for ours, theirs in zip(trained, sampled):
                worst = max(worst, float((ours[b] - theirs[0]).abs().max()))
    print(f"\n[unroll = inference, start {start}] worst |trainer - sampler| over states, sigmas, estimates: "
          f"{worst:.2g}")
    assert worst <= TOLERANCE
    assert torch.equal(trainer.calls[-1][2][-1], lr[-1])  # M = 1: the trained call reads the LR latent


def test_unroll_sigmas_are_the_samplers_schedule_from_the_start_down_to_sigma():
    """M points from the start sigma to sigma, evenly spaced in unshifted time (shift 5); front-padded with the first
    sigma for fewer calls; one call is [sigma]."""
    sigma, calls = torch.tensor([0.3, 0.7, 0.2]), torch.tensor([4, 2, 1])
    rows = unroll_sigmas(sigma, calls, 0.9, 5.0)
    u_start = unshift_sigma(0.9, 5.0)
    for row, s, m in zip(rows, sigma, calls):
        expected = shift_sigma(torch.linspace(u_start, float(unshift_sigma(s.double(), 5.0)), int(m),
                                              dtype=torch.float64), 5.0).float() if m > 1 else s[None]
        padding = torch.full((4 - int(m),), float(expected[0]))
        assert torch.allclose(row, torch.cat([padding, expected]), atol=1e-7, rtol=0)
    assert torch.equal(rows[:, -1], sigma)


def test_processes_cover_the_same_global_batch():
    one = TrainConfig(batch_size=4, grad_accumulation=2)
    two = TrainConfig(batch_size=2, grad_accumulation=2)
    for step in range(3):
        single = [i for a in range(2) for i in global_indices(step, a, one)]
        shared = [i for a in range(2) for r in range(2) for i in global_indices(step, a, two, r, 2)]
        assert sorted(single) == sorted(shared) == list(range(8 * step, 8 * step + 8))


def test_degradation_overrides_set_any_range_and_refuse_unknown_names():
    config = with_overrides("light", {"stage1": {"blur_sigma": [0.3, 0.4]}, "final": {"codec_prob": 1.0}})
    assert config.stage1.blur_sigma == (0.3, 0.4) and config.final.codec_prob == 1.0
    assert config.stage2 == DegradationConfig.preset("light").stage2
    with pytest.raises(ValueError, match="unknown stage1 field.*blur_sigmaa.*valid: .*blur_sigma"):
        with_overrides("standard", {"stage1": {"blur_sigmaa": [0.1, 1]}})
    with pytest.raises(ValueError, match="not a part"):
        with_overrides("standard", {"stage3": {}})
    with pytest.raises(ValueError, match="takes a list"):
        with_overrides("standard", {"final": {"bitrate": 5}})


class CarriedTrajectory(Trajectory):
    """Trajectory's denoiser that also reads the carried state, as the DiT with the adapter does: each frame sees its
    temporal neighbour (so known frames matter), the per-frame levels and the memory; records them."""

    def __call__(self, x, sigma, lr, estimate, carried=None):
        self.calls.append((x.clone(), torch.as_tensor(sigma).clone(), estimate.clone(),
                           carried.frame_sigmas.clone(), carried.memory.clone()))
        levels = carried.frame_sigmas.to(x).reshape(x.shape[0] if carried.frame_sigmas.ndim == 2 else 1, 1, -1, 1, 1)
        neighbour = torch.roll(x, 1, dims=2)
        return x - levels * torch.tanh(x + 0.5 * estimate - lr + 0.3 * neighbour) + 0.1 * carried.memory.mean(2, True)


def test_the_second_segment_trains_as_the_next_chunk_of_a_long_video():
    """segments = 2: the trained call of the second segment (sigma 1, one call) gets exactly what the sampler's
    first call on the next chunk gets when the first segment was the chunk before (stream.process_chunks: the
    first's one-step finish as known frames at the context level, remember(None, finished) as memory), and the loss
    is w(1) * mean |x0_hat - z0|^2 over the frames the first segment did not finish."""
    gen = torch.Generator().manual_seed(5)
    hr, lr, noise = (torch.randn(1, 4, 7, 4, 4, generator=gen) for _ in range(3))
    config = TrainConfig(segments=2, segment_overlap=2)
    carry = SegmentCarry(context_sigma=0.02, remember=remember)
    first, trainer = Trajectory(), CarriedTrajectory()

    def denoise(x, sigma, lr_latent, estimate, carried=None):
        if carried is None:  # the first segment: nothing carried into it
            return first(x, sigma, lr_latent, estimate)
        return trainer(x, sigma, lr_latent, estimate, carried)

    loss = velocity_loss(denoise, hr, lr, noise, torch.tensor([1.0]), config, carry)

    (first_lr, second_lr), (first_noise, second_noise) = two_segments(lr, 2), two_segments(noise, 2)
    assert first_lr.shape[2] == 5 and second_lr.shape[2] == 4  # 7 frames: 0-4 and 3-6, sharing 3 and 4
    finished = sample_vsr(Trajectory(), first_lr, first_noise, flow_sigmas(1, config.shift))
    known = KnownFrames((0, 1), finished[:, :, -2:], 0.02)
    sampler = CarriedTrajectory()
    sample_vsr(sampler, second_lr, second_noise, flow_sigmas(1, config.shift), known=known,
               memory=remember(None, finished))
    assert len(trainer.calls) == len(sampler.calls) == 1
    for ours, theirs in zip(trainer.calls[0], sampler.calls[0]):
        assert torch.allclose(ours.float(), theirs.float(), atol=TOLERANCE, rtol=0)
    x, _, estimate, levels, _ = sampler.calls[0]
    x0_hat = CarriedTrajectory()(x, 1.0, second_lr, estimate, Carried(levels, remember(None, finished)))
    fresh_error = (x0_hat - two_segments(hr, 2)[1])[:, :, 2:].pow(2).mean()
    assert float(loss) == pytest.approx(float(fresh_error), rel=1e-5)  # w(1) = 1, known frames left out
    with pytest.raises(ValueError, match="segment_overlap"):
        velocity_loss(denoise, hr[:, :, :3], lr[:, :, :3], noise[:, :, :3], torch.tensor([1.0]), config, carry)
