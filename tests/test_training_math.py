"""The training objective's pieces, without ComfyUI: timestep sampling, the adaptive unrolling schedule, the loss
weighting on the clean-latent error, the feedback unrolls, and the sample layout across processes."""
import pytest
import torch

from comfyui_litevsr.nodes.core.degrade import DegradationConfig, with_overrides
from comfyui_litevsr.nodes.core.training import (SIGMA_MIN, TrainConfig, global_indices, loss_weight, sample_sigma,
                                                  unroll_count, velocity_loss)


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


def test_loss_weight_is_clamped_sigma_minus_two():
    sigma = torch.tensor([1.0, 0.5, 0.1, 0.01])
    assert loss_weight(sigma, TrainConfig(max_loss_weight=50)).tolist() == pytest.approx([1, 4, 50, 50])
    assert loss_weight(sigma, TrainConfig(loss_weighting="none")).tolist() == [1, 1, 1, 1]


class Recorder:
    """A denoiser that returns a fixed x0 and records the estimates it is shown."""

    def __init__(self, x0):
        self.x0, self.shown = x0, []

    def __call__(self, x, sigma, lr, estimate):
        self.shown.append(estimate.clone())
        return self.x0 + 0 * x


@pytest.mark.parametrize("weighting,max_weight,expected", [
    ("litevsr", 100.0, lambda s: min(s ** -2, 100.0)), ("litevsr", 10.0, lambda s: min(s ** -2, 10.0)),
    ("none", 100.0, lambda s: 1.0)])
def test_effective_weight_on_the_clean_latent_error(weighting, max_weight, expected):
    """A denoiser off the HR latent by delta: loss / mean(delta^2) is w(sigma) exactly (sigma^-2, clamped, or 1),
    whatever the unrolls did before the trained call. sigma 0.05 and 0.2 lie past the clamp at 100 and at 10."""
    gen = torch.Generator().manual_seed(1)
    hr, lr, noise, delta = (torch.randn(5, 4, 2, 4, 4, generator=gen) for _ in range(4))
    config = TrainConfig(max_unrolls=3, loss_weighting=weighting, max_loss_weight=max_weight)
    sigma = torch.tensor([1.0, 0.9, 0.5, 0.2, 0.05])
    loss = velocity_loss(lambda x, s, lr, estimate: hr + delta, hr, lr, noise, sigma, config)
    effective = loss / delta.pow(2).flatten(1).mean(dim=1)
    assert effective.tolist() == pytest.approx([expected(float(s)) for s in sigma], rel=1e-5)
    assert velocity_loss(lambda x, s, lr, estimate: hr, hr, lr, noise, sigma, config).abs().max() == 0


def test_unrolls_feed_each_clean_estimate_back_per_sample():
    hr, lr, noise = torch.zeros(2, 1, 1, 2, 2), torch.full((2, 1, 1, 2, 2), 7.0), torch.zeros(2, 1, 1, 2, 2)
    sigma = torch.tensor([0.95, 0.1])  # M = 1 and M = 3 with max_unrolls 3
    recorder = Recorder(torch.full_like(hr, 2.0))
    velocity_loss(recorder, hr, lr, noise, sigma, TrainConfig(max_unrolls=3))
    assert len(recorder.shown) == 3  # two gradient-free feedback calls, then the trained call
    assert torch.equal(recorder.shown[0], lr)  # the first estimate is the LR latent
    trained_call = recorder.shown[-1]
    assert torch.equal(trained_call[0], lr[0])  # sample with M = 1 never got feedback
    assert torch.equal(trained_call[1], torch.full_like(lr[1], 2.0))  # sample with M = 3 sees the fed-back x0


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
