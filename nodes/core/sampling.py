"""Few-step flow-matching sampling with clean-estimate feedback (pure functions, ComfyUI's Wan conventions).

Conventions (rectified flow, sigma in [0, 1], sigma = 1 is pure noise):
  noising        x_sigma = sigma * noise + (1 - sigma) * x0
  denoiser       x0_hat  = denoise(x_sigma, sigma, lr, estimate[, carried])   (the DiT predicts v = noise - x0)
  Euler step     x_next  = x + (sigma_next - sigma) * (x - x0_hat) / sigma
The adapter's refinement stream reads the current clean estimate: it starts at the LR latent and is replaced by
each call's x0_hat (LiteVSR's state feedback).

Carried state for long videos (`Carried`, `KnownFrames`): `known` latent frames (the previous chunk's finished
clean latents over the overlap) are held at a fixed context noise level c in every model input,
c * noise + (1 - c) * known, whatever the step's sigma, and the DiT is told c on those frames: per-frame noise
levels (`Carried.frame_sigmas`), which the Wan DiT takes as per-frame timesteps. c is a fact of the backbone family
(`backbones.Family.context_sigma`: 0, clean, for Wan2.2 TI2V-5B; 0.02 for Wan2.1; ARCHITECTURE.md says why), so
even a one-step run from pure noise sees the finished frames. The clean estimate fed back and the output hold the
known frames exactly. Frames that are not known never read them directly: a model without temporal interaction
gives the same result as without carried state. `memory` (the adapter's memory of earlier chunks) rides along
unchanged in every call.

The denoise protocol: `denoise(x, sigma, lr_latent, estimate) -> x0_hat`, with a fifth argument `carried` (a
`Carried`) only when there is carried state, so a denoiser that never sees any keeps four arguments.

The feedback and the carried frames wrap the denoiser into a k-diffusion model `model(x, sigma) -> x0_hat`, so a
stepper is a k-diffusion style `sample_*(model, x, sigmas, callback=None)` that knows neither; `sample_euler` is
the one in use, and another is passed to `sample_vsr` as `stepper`.
"""
from dataclasses import dataclass
from typing import Optional

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
class Carried:
    """What a chunk carries from the chunks before it, as `denoise` receives it.

    frame_sigmas: the noise level the DiT is told per latent frame, [T] or [B, T] (None: the call's sigma on all).
    memory: the adapter's memory of earlier chunks, a latent-space tensor [B, C, M, h, w] on the latent's spatial
        grid (None: no memory)."""

    frame_sigmas: Optional[torch.Tensor] = None
    memory: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class KnownFrames:
    """Latent frames fixed in advance: `values [B, C, len(frames), h, w]` at latent frame indices `frames`, shown to
    the DiT at the context noise level `sigma` (0: clean)."""

    frames: tuple
    values: "torch.Tensor"
    sigma: float = 0.0

    def put(self, x, values):
        """x with `values` on the known frames."""
        x = x.clone()
        x[:, :, list(self.frames)] = values.to(x)
        return x

    def context(self, noise):
        """The known frames' state at the context level, with the noise a whole-clip run has there (the previous
        chunk drew the same)."""
        return self.sigma * noise[:, :, list(self.frames)].to(self.values) + (1 - self.sigma) * self.values

    def frame_sigmas(self, frames, sigma):
        """The context level on the known frames, the step's sigma on the others: [frames] for a number, [B, frames]
        for one sigma per sample (the trainer's)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32).cpu()
        sigmas = sigma[..., None].repeat(*([1] * sigma.ndim), frames)
        sigmas[..., list(self.frames)] = self.sigma
        return sigmas


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


def with_carried(denoise, known, noise, memory):
    """`denoise` given the carried state on every call: the known frames at their context state in its input and
    their level in `Carried.frame_sigmas`, `memory` as is; its x0_hat holds the known values, which the refinement
    stream then reads. The model never reads the stepper's own values on the known frames, so an elementwise
    stepper (Euler, Heun) gives the other frames exactly what imposing them on its state would."""
    context = None if known is None else known.context(noise)

    def carried_denoise(x, sigma, lr_latent, estimate):
        if known is None:
            return denoise(x, sigma, lr_latent, estimate, Carried(memory=memory))
        carried = Carried(known.frame_sigmas(x.shape[2], sigma), memory)
        return known.put(denoise(known.put(x, context), sigma, lr_latent, estimate, carried), known.values)

    return carried_denoise


def sample_vsr(denoise, lr_latent, noise, sigmas, start="noise", on_step=None, known=None, stepper=sample_euler,
               memory=None):
    """Runs `stepper` over the schedule with state feedback and the carried state (`known` frames, the adapter's
    `memory`); returns the final clean latent. `on_step(done, steps)` fires once per step."""
    if start == "noise" and float(sigmas[0]) != 1.0:
        raise ValueError("starting from noise needs the schedule to start at sigma 1")
    steps = len(sigmas) - 1
    callback = None if on_step is None else (lambda info: on_step(info["i"] + 1, steps))
    estimate = lr_latent
    if known is not None or memory is not None:
        denoise = with_carried(denoise, known, noise, memory)
    if known is not None:
        estimate = known.put(lr_latent, known.values)
    x = stepper(with_feedback(denoise, lr_latent, estimate), initial_state(start, lr_latent, noise), sigmas, callback)
    return x if known is None else known.put(x, known.values)


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
