"""Few-step flow-matching sampling with clean-estimate feedback (pure functions, ComfyUI's Wan conventions).

Conventions (rectified flow, sigma in [0, 1], sigma = 1 is pure noise):
  noising        x_sigma = sigma * noise + (1 - sigma) * x0
  denoiser       x0_hat  = denoise(x_sigma, sigma, lr, estimate)     (the DiT predicts v = noise - x0)
  Euler step     x_next  = x + (sigma_next - sigma) * (x - x0_hat) / sigma
The adapter's refinement stream reads the current clean estimate: it starts at the LR latent and is replaced by
each call's x0_hat (LiteVSR's state feedback).

Carried state for long videos: `known` latent frames (the previous chunk's finished clean latents over the
overlap) are held at their flow-matching state sigma * noise + (1 - sigma) * known in every model input, so the
DiT's temporal attention sees the finished frames as context, and they come out unchanged. Frames that are not
known never read them directly: a model without temporal interaction gives the same result as without carried
state.

The feedback and the carried frames wrap the denoiser into a k-diffusion model `model(x, sigma) -> x0_hat`, so a
stepper is a k-diffusion style `sample_*(model, x, sigmas, callback=None)` that knows neither; `sample_euler` is
the one in use, and another is passed to `sample_vsr` as `stepper`.
"""
from dataclasses import dataclass

import torch

START_MODES = ("noise", "lr_latent")
LR_LATENT_START_SIGMA = 0.4  # default noise level the LR latent is taken as, for start = "lr_latent"


def shift_sigma(u, shift):
    """ComfyUI's flow time shift: sigma(u) = shift * u / (1 + (shift - 1) * u)."""
    return shift * u / (1 + (shift - 1) * u)


def unshift_sigma(sigma, shift):
    return sigma / (shift - (shift - 1) * sigma)


def flow_sigmas(steps, shift, start_sigma=1.0):
    """steps + 1 sigmas from start_sigma to 0, evenly spaced in unshifted time (ComfyUI's "simple" schedule)."""
    if steps < 1:
        raise ValueError("steps must be at least 1")
    if not 0 < start_sigma <= 1:
        raise ValueError(f"start sigma must be in (0, 1], got {start_sigma}")
    u = torch.linspace(unshift_sigma(start_sigma, shift), 0.0, steps + 1, dtype=torch.float64)
    return shift_sigma(u, shift).float()


def euler_step(x, x0, sigma, sigma_next):
    """x at sigma_next. sigma, sigma_next: numbers, or per-sample tensors broadcasting over x (the trainer's unrolls,
    one sigma per sample). A step to sigma 0 gives exactly the clean estimate, not x0 plus rounding."""
    x_next = x + (sigma_next - sigma) * (x - x0) / sigma
    return torch.where(torch.as_tensor(sigma_next == 0, device=x.device), x0, x_next)


def first_sigma(start, start_sigma):
    """The schedule's first sigma: 1 from noise, `start_sigma` from the LR latent."""
    return 1.0 if start == "noise" else start_sigma


def initial_state(start, lr_latent, noise):
    """'noise' starts at sigma = 1 from pure noise (the paper); 'lr_latent' uses the LR latent itself as x at the
    start sigma, with no noise added (InfVSR/DOVE)."""
    if start == "noise":
        return noise
    if start == "lr_latent":
        return lr_latent.clone()
    raise ValueError(f"unknown start {start!r}; use one of {START_MODES}")


@dataclass(frozen=True)
class KnownFrames:
    """Latent frames fixed in advance: `values [B, C, len(frames), h, w]` at latent frame indices `frames`."""

    frames: tuple
    values: "torch.Tensor"

    def impose(self, x, sigma, noise):
        """x with the known frames replaced by their state at `sigma`: the flow-matching state (noise shared with
        the previous chunk) when sampling from noise, the clean frames when sampling from the LR latent (whose
        state is clean content too)."""
        index = list(self.frames)
        values = self.values.to(x)
        x = x.clone()
        x[:, :, index] = values if noise is None else sigma * noise[:, :, index].to(x) + (1 - sigma) * values
        return x


def sample_euler(model, x, sigmas, callback=None):
    """k-diffusion's sample_euler with a float sigma; the step to sigma 0 returns the clean estimate exactly."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigma)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        x = euler_step(x, denoised, sigma, sigma_next)
    return x


def with_feedback(denoise, lr_latent, estimate):
    """`model(x, sigma)` over `denoise(x, sigma, lr_latent, estimate)`: every call reads the previous call's x0_hat
    (the first reads `estimate`). A stepper calling the model more than once a step (Heun) feeds back every call."""
    def model(x, sigma):
        nonlocal estimate
        estimate = denoise(x, sigma, lr_latent, estimate)
        return estimate
    return model


def with_known(model, known, noise):
    """`model` with the known frames held at their state at sigma in its input. The model never reads the
    stepper's own values on those frames, and sample_vsr imposes them again at the end, so an elementwise stepper
    (Euler, Heun) gives the other frames exactly what imposing them on its state would."""
    return lambda x, sigma: model(known.impose(x, sigma, noise), sigma)


def sample_vsr(denoise, lr_latent, noise, sigmas, start="noise", on_step=None, known=None, stepper=sample_euler):
    """Runs `stepper` over the schedule with state feedback and carried frames; returns the final clean latent.
    `on_step(done, steps)` fires once per step."""
    if start == "noise" and float(sigmas[0]) != 1.0:
        raise ValueError("starting from noise needs the schedule to start at sigma 1")
    steps = len(sigmas) - 1
    callback = None if on_step is None else (lambda info: on_step(info["i"] + 1, steps))
    model = with_feedback(denoise, lr_latent, lr_latent if known is None else known.impose(lr_latent, 0.0, noise))
    if known is not None:
        model = with_known(model, known, noise if start == "noise" else None)
    x = stepper(model, initial_state(start, lr_latent, noise), sigmas, callback)
    return x if known is None else known.impose(x, 0.0, noise)


def seeded_noise(shape, seed):
    """Noise drawn on the CPU so a seed gives the same video on every device (as ComfyUI does)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def video_noise(shape, seed, first_frame=0, temporal_stride=4):
    """Noise `[B, C, T, h, w]` keyed by video position: latent frame j of a clip starting at pixel frame
    `first_frame` gets the noise of the latent group ending at pixel frame first_frame + stride * j. Chunks of a
    long video therefore draw the same noise for the same frames as a whole-clip run."""
    batch, channels, frames, height, width = shape
    keys = [(seed * 1_000_003 + first_frame + temporal_stride * j) % 2**63 for j in range(frames)]
    return torch.stack([seeded_noise((batch, channels, height, width), key) for key in keys], dim=2)
