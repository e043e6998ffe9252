"""Training the State-Aware Adapter on a frozen backbone (pure torch; the model call comes in as a function).

Objective, in ComfyUI's Wan flow convention (sigma = t, the model returns its clean estimate x0_hat):
  loss = w(sigma) * mean |x0_hat - z0|^2        z0: HR latent
  w    = min(sigma^-2, max_loss_weight)  ("litevsr"),   1  ("none")
On the straight path z_sigma = sigma * noise + (1 - sigma) * z0 the velocity error (z_sigma - x0_hat)/sigma -
(noise - z0) is (z0 - x0_hat)/sigma, so "litevsr" is the plain flow-matching velocity MSE the backbone was trained
with, clamped so that sigma -> 0 cannot dominate. The loss is written on the clean error because the unrolled state
below is not on that straight path, and the clean error means the same thing anywhere.
Trajectory unrolling (the LiteVSR paper's adaptive schedule, on the inference trajectory): a sample at sigma gets
  M(sigma) = round(1 + s p / (1 + (s - 1) p) * (M_max - 1)),  p = 1 - sigma / sigma_start,  s = 5
model calls at M sigmas from the start sigma down to sigma, spaced as the sampler's schedule. The state enters at
the first of them on the line from the start state to z0 (pure noise at sigma 1, or the LR latent at its start
sigma: `start`), M - 1 gradient-free Euler steps with clean-estimate feedback take it to sigma as sample_vsr would,
and the last call, trained, sees the state and the estimate of the previous, noisier step.
The loss is a parameter of the trainer: an objective is `objective(denoise, hr_latent, lr_latent, noise, sigma,
config) -> per-sample loss [B]` (velocity_loss by default); `unrolled_denoise` gives it the trained call. An
objective that trains a second player (distill.Distillation's discriminators) also has `update(trainer)`, called
after each optimizer step, `state_tensors()` / `state_metadata()` / `load_state()` for checkpoints, and may have a
`validation` measure.

Every random choice of a sample (clip, crop, degradation, noise, sigma) is a pure function of (seed, sample
index), and sample indices are laid out so that K processes with batch B/K draw the same global batch as one
process with batch B: resuming, or changing the number of processes, does not change what is trained on.
"""
import functools
import math
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np
import torch

from .degrade import apply_degradation, sample_degradation
from .frames import resize_frames
from .sampling import (LR_LATENT_START_SIGMA, START_MODES, KnownFrames, euler_step, first_sigma, flow_sigmas,
                       initial_state, sample_vsr, shift_sigma, unshift_sigma, with_carried)

TIMESTEP_SAMPLING = ("shifted", "logit_normal", "uniform")
LOSS_WEIGHTINGS = ("litevsr", "none")
SIGMA_MIN = 1e-3  # sigma = 0 is the clean latent itself: nothing left to denoise
TRAIN_STREAM, VALIDATION_STREAM = 0, 1  # seed streams: validation samples never collide with training samples


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    batch_size: int = 1  # clips per forward pass in each process
    grad_accumulation: int = 1  # forward passes per optimizer step
    timestep_sampling: str = "shifted"
    shift: float = 5.0  # for "shifted": sigma = shift u / (1 + (shift - 1) u), biased toward high noise
    logit_mean: float = 0.0  # for "logit_normal": sigma = sigmoid(N(mean, std))
    logit_std: float = 1.0
    max_unrolls: int = 3  # M_max of the adaptive unrolling schedule; 1 = no feedback unrolls
    unroll_shift: float = 5.0  # s of the schedule
    loss_weighting: str = "litevsr"
    max_loss_weight: float = 100.0  # clamp of w = sigma^-2 on the clean-latent error (= a sigma floor of 0.1)
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    seed: int = 0
    start: str = "noise"  # the sampler's start this trains for (sampling.START_MODES)
    start_sigma: float = LR_LATENT_START_SIGMA  # for start "lr_latent": the noise level the LR latent is taken as
    segments: int = 1  # 2: each clip is two consecutive segments, the second trained with what the first finished
    segment_overlap: int = 2  # latent frames the two segments share (a long video's chunk overlap: 8 frames = 2)

    def __post_init__(self):
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"unknown timestep sampling {self.timestep_sampling!r}; use one of {TIMESTEP_SAMPLING}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"unknown loss weighting {self.loss_weighting!r}; use one of {LOSS_WEIGHTINGS}")
        if self.start not in START_MODES:
            raise ValueError(f"unknown start {self.start!r}; use one of {START_MODES}")
        if not SIGMA_MIN < self.start_sigma <= 1:
            raise ValueError(f"start_sigma must be in ({SIGMA_MIN}, 1], got {self.start_sigma}")
        if self.steps < 1 or self.batch_size < 1 or self.grad_accumulation < 1 or self.max_unrolls < 1:
            raise ValueError("steps, batch_size, grad_accumulation and max_unrolls must each be at least 1")
        if self.segments not in (1, 2) or self.segment_overlap < 1:
            raise ValueError(f"segments must be 1 or 2 and segment_overlap at least 1, got {self.segments} and "
                             f"{self.segment_overlap}")

    def to_dict(self):
        return asdict(self)

    @property
    def first_sigma(self):
        """The noise level the start state is at: 1 for noise, start_sigma for the LR latent."""
        return first_sigma(self.start, self.start_sigma)


# --- the math -----------------------------------------------------------------------------------------------------

def sample_sigma(config, generator, count=1):
    """Training noise levels in [SIGMA_MIN, first sigma] from a torch generator: the timestep distribution restricted
    to (0, first sigma], drawn by its inverse CDF from a uniform draw below the CDF at the first sigma."""
    top = torch.tensor(config.first_sigma, dtype=torch.float64)
    u = torch.rand(count, generator=generator, dtype=torch.float64)
    if config.timestep_sampling == "logit_normal":  # sigmoid(mean + std * N(0, 1)), by the normal's inverse CDF
        below = torch.special.ndtr((torch.logit(top) - config.logit_mean) / config.logit_std)
        sigma = torch.sigmoid(config.logit_mean + config.logit_std * torch.special.ndtri(u * below))
    elif config.timestep_sampling == "uniform":
        sigma = u * top
    else:
        sigma = shift_sigma(u * unshift_sigma(top, config.shift), config.shift)
    return sigma.clamp(SIGMA_MIN, 1.0).float()


def unroll_count(level, max_unrolls, s=5.0):
    """M of the adaptive unrolling schedule at `level` = sigma / first sigma: 1 model call at the start, up to
    max_unrolls near clean."""
    progress = 1.0 - level.double()
    shaped = s * progress / (1 + (s - 1) * progress)
    return torch.round(1 + shaped * (max_unrolls - 1)).long()


def unroll_sigmas(sigma, calls, start_sigma, shift):
    """`[B, max(calls)]`: per sample, `calls` sigmas from start_sigma down to its sigma, evenly spaced in unshifted
    time as the sampler's schedule (flow_sigmas); one call is just [sigma]. Shorter rows repeat their first sigma in
    front (steps of length 0), so every row ends at its sample's sigma."""
    longest = int(calls.max())
    calls = calls[:, None]
    position = (torch.arange(longest) - (longest - calls)).clamp(min=0).double()
    fraction = torch.where(calls > 1, position / (calls - 1).clamp(min=1), 1.0)
    u_start, u_end = unshift_sigma(start_sigma, shift), unshift_sigma(sigma.double()[:, None], shift)
    return shift_sigma(u_start + fraction * (u_end - u_start), shift).float()


def loss_weight(sigma, config):
    """w(sigma) on the clean-latent error: the one weighting of the loss (the module docstring says why)."""
    if config.loss_weighting == "none":
        return torch.ones_like(sigma)
    return sigma.pow(-2).clamp(max=config.max_loss_weight)


def _per_sample(values, like):
    """One value per sample `[B]`, on `like`'s device, shaped to broadcast over `like` `[B, ...]`."""
    return values.to(like.device).reshape(-1, *([1] * (like.ndim - 1)))


def entry_state(start_state, hr_latent, sigma, start_sigma):
    """The state at per-sample `sigma` on the line from the start state (at start_sigma) to the HR latent:
    (sigma / s) x_start + (1 - sigma / s) z0; the start state itself at sigma = start_sigma."""
    level = _per_sample(sigma / start_sigma, hr_latent).to(hr_latent.dtype)
    return level * start_state + (1 - level) * hr_latent


def feedback_steps(denoise, x, lr_latent, estimate, sigmas):
    """Gradient-free Euler steps with clean-estimate feedback along per-sample schedules `sigmas [B, K + 1]`, as
    sample_vsr takes them (with_feedback, euler_step): each call reads the previous call's clean estimate.
    Returns (the state at sigmas[:, -1], the last estimate). A step of length 0 (a row's front padding) keeps its
    state and its estimate."""
    with torch.no_grad():
        for k in range(sigmas.shape[1] - 1):
            sigma, sigma_next = sigmas[:, k], sigmas[:, k + 1]
            fed_back = denoise(x, sigma, lr_latent, estimate).to(x.dtype)
            estimate = torch.where(_per_sample(sigma_next < sigma, x), fed_back, estimate)
            x = euler_step(x, fed_back, _per_sample(sigma, x), _per_sample(sigma_next, x))
    return x, estimate


def unrolled_denoise(denoise, hr_latent, lr_latent, noise, sigma, config, estimate=None):
    """x0_hat of the trained call at `sigma`, at the end of its inference trajectory: the state enters at the first
    of M(sigma) sigmas (unroll_sigmas), M - 1 gradient-free feedback steps bring it to sigma, and the last call sees
    the previous step's estimate (the first call sees `estimate`, by default the LR latent). Gradients reach the
    adapter through this call only."""
    start = config.first_sigma
    calls = unroll_count(sigma / start, config.max_unrolls, config.unroll_shift)
    sigmas = unroll_sigmas(sigma, calls, start, config.shift)
    x = entry_state(initial_state(config.start, lr_latent, noise), hr_latent, sigmas[:, 0], start)
    x, estimate = feedback_steps(denoise, x, lr_latent, lr_latent if estimate is None else estimate, sigmas)
    return denoise(x, sigma, lr_latent, estimate)


def two_segments(latent, overlap):
    """(first, second) of latents [B, C, T, ...] cut into two consecutive segments that share `overlap` frames, as
    a long video's chunks do: the second starts `overlap` frames before the first ends."""
    frames = latent.shape[2]
    if frames < overlap + 2:
        raise ValueError(f"two segments sharing {overlap} latent frames need clips of at least {overlap + 2} latent "
                         f"frames, got {frames}: use longer clips (clip_frames) or a smaller segment_overlap")
    first_end = (frames + overlap + 1) // 2
    return latent[:, :, :first_end], latent[:, :, first_end - overlap:]


@dataclass(frozen=True)
class SegmentCarry:
    """How a long video hands state from chunk to chunk, for training the second of two segments as its next chunk:
    known frames shown at the backbone family's `context_sigma`, and the adapter's `remember` rule (None: the
    adapter keeps no memory)."""

    context_sigma: float
    remember: Optional[Callable] = None

    def second_segment(self, denoise, hr_latent, lr_latent, noise, config):
        """(denoise, hr, lr, noise, first estimate) of the second segment: the first is upscaled gradient-free in
        one step (the sampler's default) as the previous chunk, its finished latents over the overlap become the
        second's known frames and its memory the second's, exactly as stream.process_chunks carries them."""
        overlap = config.segment_overlap
        (first_lr, lr_latent), (first_noise, noise) = two_segments(lr_latent, overlap), two_segments(noise, overlap)
        with torch.no_grad():
            finished = sample_vsr(denoise, first_lr, first_noise, flow_sigmas(1, config.shift, config.first_sigma),
                                  config.start)
        known = KnownFrames(tuple(range(overlap)), finished[:, :, -overlap:], self.context_sigma)
        memory = None if self.remember is None else self.remember(None, finished)
        return (with_carried(denoise, known, noise, memory), two_segments(hr_latent, overlap)[1], lr_latent, noise,
                known.put(lr_latent, known.values))


def velocity_loss(denoise, hr_latent, lr_latent, noise, sigma, config, carry=None):
    """w(sigma) * mean |x0_hat - z0|^2 per sample `[B]`: the default objective (with "litevsr" weighting, the
    flow-matching velocity MSE; see the module docstring). With `carry` (config.segments = 2) the loss is the
    second segment's, over the frames the first did not finish."""
    estimate, fresh = None, 0
    if carry is not None:
        denoise, hr_latent, lr_latent, noise, estimate = carry.second_segment(denoise, hr_latent, lr_latent, noise,
                                                                              config)
        fresh = config.segment_overlap
    predicted = unrolled_denoise(denoise, hr_latent, lr_latent, noise, sigma, config, estimate).float()
    clean_error = (predicted - hr_latent.float())[:, :, fresh:].pow(2).flatten(1).mean(dim=1)
    return loss_weight(sigma, config).to(clean_error.device) * clean_error


def segment_objective(objective, carry):
    """The objective of config.segments = 2: the velocity loss of the second segment given `carry`."""
    if objective is not velocity_loss:
        raise ValueError("training on two segments is for the velocity loss; distillation trains one-step clips: "
                         "set segments to 1")
    return functools.partial(velocity_loss, carry=carry)


# --- samples ------------------------------------------------------------------------------------------------------

def sample_rng(seed, stream, index):
    return np.random.default_rng([seed, stream, index])


def global_indices(step, accumulation_index, config, rank=0, world=1):
    """Sample indices of one forward pass: the global batch of a step is contiguous, ranks take consecutive runs.
    One process with batch B and K processes with batch B / K therefore cover the same indices."""
    per_pass = config.batch_size * world
    first = (step * config.grad_accumulation + accumulation_index) * per_pass + rank * config.batch_size
    return list(range(first, first + config.batch_size))


@dataclass(frozen=True)
class TrainingSample:
    hr_latent: torch.Tensor  # [1, C, T, h, w]
    lr_latent: torch.Tensor
    noise: torch.Tensor
    sigma: torch.Tensor  # [1]


class PairMaker:
    """HR clip -> degraded LR clip -> bicubic back to HR size -> both VAE-encoded, from (seed, stream, index).

    `encode(frames [T, H, W, 3]) -> latent [1, C, t, h, w]` in the model's latent space is supplied by the caller
    (the VAE lives in ComfyUI)."""

    def __init__(self, dataset, degradation, scale, encode, config):
        self.dataset, self.degradation, self.scale = dataset, degradation, scale
        self.encode, self.config = encode, config

    def frames(self, stream, index):
        rng = sample_rng(self.config.seed, stream, index)
        clip_rng = np.random.default_rng(rng.integers(2**63))
        degradation_seed = int(rng.integers(2**63))
        hr = self.dataset.sample(clip_rng)
        lr = apply_degradation(hr, self.scale, sample_degradation(self.degradation, degradation_seed))
        return hr, lr, rng

    def sample(self, stream, index, sigma=None):
        hr, lr, rng = self.frames(stream, index)
        with torch.no_grad():
            hr_latent = self.encode(hr)
            lr_latent = self.encode(resize_frames(lr, *hr.shape[1:3]))
        generator = torch.Generator().manual_seed(int(rng.integers(2**63)))
        noise = torch.randn(hr_latent.shape, generator=generator, dtype=torch.float32)
        sigma = sample_sigma(self.config, generator) if sigma is None else torch.tensor([float(sigma)])
        return TrainingSample(hr_latent.float(), lr_latent.float(), noise, sigma)

    def batch(self, indices, stream=TRAIN_STREAM):
        samples = [self.sample(stream, index) for index in indices]
        return TrainingSample(*(torch.cat([getattr(s, name) for s in samples])
                                for name in ("hr_latent", "lr_latent", "noise", "sigma")))


VALIDATION_LEVELS = (0.25, 0.5, 0.75, 1.0)  # validation sigmas as fractions of the first sigma


def validation_set(pairs, clips):
    """Fixed held-out samples: `clips` clips from the validation stream, each at every sigma of VALIDATION_LEVELS
    times the first sigma of the start trained for."""
    return [pairs.sample(VALIDATION_STREAM, clip, level * pairs.config.first_sigma)
            for clip in range(clips) for level in VALIDATION_LEVELS]


def validation_loss(denoise, samples, config, device, objective=velocity_loss):
    """Mean held-out loss: the objective's own, or its `validation` where it has one (an objective with adversarial
    terms reports the distance it is meant to close)."""
    measure = getattr(objective, "validation", objective)
    with torch.no_grad():
        losses = [measure(denoise, s.hr_latent.to(device), s.lr_latent.to(device), s.noise.to(device),
                            s.sigma, config) for s in samples]
    return float(torch.cat(losses).mean())


# --- the optimizer loop -------------------------------------------------------------------------------------------

class World:
    """This process's place in a data-parallel group; gradients are averaged over it (gloo or nccl)."""

    def __init__(self, rank=0, size=1):
        self.rank, self.size = rank, size

    def sum_(self, tensors):
        """In-place sum over the group of same-device tensors."""
        if self.size > 1:
            import torch.distributed as dist

            flat = torch.cat([t.reshape(-1) for t in tensors])
            dist.all_reduce(flat)
            offset = 0
            for t in tensors:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


def optimizer_state_tensors(optimizer, prefix):
    """An optimizer's per-parameter state as plain tensors `<prefix>.<index>.<slot>` (for a safetensors sidecar)."""
    return {f"{prefix}.{index}.{name}": torch.as_tensor(value).detach().cpu().clone()
            for index, slots in optimizer.state_dict()["state"].items() for name, value in slots.items()}


def load_optimizer_state(optimizer, tensors, prefix, param_groups=None):
    """Restores what optimizer_state_tensors wrote; `param_groups`: saved group settings (default: the current)."""
    state = {}
    for key, value in tensors.items():
        if key.startswith(f"{prefix}."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    groups = optimizer.state_dict()["param_groups"]
    for group, saved in zip(groups, param_groups or []):
        group.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


class AdapterTrainer:
    """AdamW on the adapter's parameters; one `step()` is one optimizer step over the global batch of `objective`.
    Sigma reaches the objective on the CPU, the latents on the device."""

    def __init__(self, adapter, denoise, pairs, config, device="cpu", world=None, autocast_dtype=None,
                 objective=velocity_loss):
        self.adapter, self.denoise, self.pairs, self.config = adapter, denoise, pairs, config
        self.objective = objective
        self.device, self.world, self.autocast_dtype = torch.device(device), world or World(), autocast_dtype
        adapter.requires_grad_(True)
        self.parameters = [p for p in adapter.parameters()]
        for p in self.parameters:  # every parameter has a gradient tensor, so all processes reduce the same list
            p.grad = torch.zeros_like(p)
        self.optimizer = torch.optim.AdamW(self.parameters, lr=config.learning_rate,
                                           weight_decay=config.weight_decay)
        # fp16 needs loss scaling; bf16 and fp32 do not
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=autocast_dtype == torch.float16)
        self.step_count = 0
        self.losses = []  # global mean training loss of every optimizer step

    def _forward(self, batch):
        move = (lambda t: t.to(self.device))
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            return self.objective(self.denoise, move(batch.hr_latent), move(batch.lr_latent), move(batch.noise),
                                  batch.sigma, self.config)

    def step(self):
        config, world = self.config, self.world
        global_count = config.batch_size * config.grad_accumulation * world.size
        self.optimizer.zero_grad(set_to_none=False)
        loss_sum = torch.zeros(1, dtype=torch.float64)
        for accumulation in range(config.grad_accumulation):
            indices = global_indices(self.step_count, accumulation, config, world.rank, world.size)
            per_sample = self._forward(self.pairs.batch(indices))
            self.scaler.scale(per_sample.sum() / global_count).backward()
            loss_sum += per_sample.detach().double().sum().cpu()
        world.sum_([p.grad for p in self.parameters])
        loss_sum = loss_sum.to(self.parameters[0].device)
        world.sum_([loss_sum])
        loss = float(loss_sum) / global_count
        if not math.isfinite(loss):  # before the update, so the last checkpoint and the weights stay usable
            raise FloatingPointError(f"training loss became {loss} at step {self.step_count}: lower the learning "
                                     "rate, or train in bf16/fp32 instead of fp16")
        self.scaler.unscale_(self.optimizer)
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.parameters, config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step_count += 1
        self.losses.append(loss)
        if hasattr(self.objective, "update"):
            self.objective.update(self)
        return loss

    # -- state for checkpoints: plain tensors and JSON-able values, never pickled objects
    def state_tensors(self):
        tensors = optimizer_state_tensors(self.optimizer, "optimizer")
        tensors["losses"] = torch.tensor(self.losses, dtype=torch.float64)
        if hasattr(self.objective, "state_tensors"):
            tensors.update({f"objective.{name}": value for name, value in self.objective.state_tensors().items()})
        return tensors

    def state_metadata(self):
        groups = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.state_dict()["param_groups"]]
        metadata = {"step": self.step_count, "param_groups": groups, "loss_scale": self.scaler.get_scale()
                    if self.scaler.is_enabled() else None}
        if hasattr(self.objective, "state_metadata"):
            metadata["objective"] = self.objective.state_metadata()
        return metadata

    def load_state(self, tensors, metadata):
        load_optimizer_state(self.optimizer, tensors, "optimizer", metadata["param_groups"])
        if metadata.get("loss_scale") and self.scaler.is_enabled():
            self.scaler.update(float(metadata["loss_scale"]))
        self.step_count = int(metadata["step"])
        self.losses = [float(v) for v in tensors["losses"]]
        if hasattr(self.objective, "load_state"):
            prefix = "objective."
            self.objective.load_state({name[len(prefix):]: value for name, value in tensors.items()
                                       if name.startswith(prefix)}, metadata.get("objective", {}))
