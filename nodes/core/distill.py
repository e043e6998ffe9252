"""One-step distillation of an adapter (pure torch; the model calls come in as functions).

AdcVSR distils a multi-step teacher into a one-step student with dual-head adversarial training; here the teacher is
the adapter-steered sampler at N steps (a frozen adapter), the student an adapter started from it and trained to get
there in one step. With x_s = the student's one-step clean latent and x_T = the teacher's N-step one, from the same
LR latent and the same noise:

  generator      L_G = w_T |x_s - x_T|^2 + w_HR |x_s - z_HR|^2 + l_f g(D_f(x_s)) + l_p g(D_p(x_s))
  discriminator  L_D = d(D(real), D(fake)) + r1/2 |grad of D(real) by its input|^2        (per discriminator)

Two discriminators, each a dual head (`DualHead`) over one feature map:
  feature domain  D_f: the frozen DiT's own first k blocks (`trunk(latent, sigma)`) at sigma_d as the trunk, as
                  latent adversarial distillation does, with only a light head trained; real and fake are noised
                  with the sample's own noise, so they differ only in their clean latents;
  pixel domain    D_p: a small conv trunk + head on decoded frames (`decode(latent)`, a centre crop of the latent).
Each head splits its channels into a detail part, judged frame by frame, and a temporal part, judged on frame
differences by a 1D conv over time (AdcVSR's best split: 75/25). `real` is the teacher's output (distillation) or
the HR latent. g/d: hinge or non-saturating.

`Distillation` is an objective for core.training.AdapterTrainer: called like velocity_loss it returns the
generator loss per sample; the trainer then calls its `update(trainer)` once per optimizer step to train the
discriminators on the same batch, and checkpoints its `state_tensors()`.
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .memory import dit_step_bytes, dit_step_flops, dit_tokens, dit_weight_bytes
from .sampling import flow_sigmas, sample_vsr
from .training import load_optimizer_state, optimizer_state_tensors

ADVERSARIAL_LOSSES = ("hinge", "non_saturating")
REAL_TARGETS = ("teacher", "hr")
DISCRIMINATORS = ("feature", "pixel")


@dataclass(frozen=True)
class DistillConfig:
    teacher_steps: int = 4  # N of the teacher's sampler
    teacher_shift: float = 5.0  # sampling shift of the teacher's schedule (the student takes the one step from sigma 1)
    teacher_weight: float = 1.0  # w_T: regression of x_s to the teacher's clean latent
    hr_weight: float = 0.0  # w_HR: regression of x_s to the HR latent
    feature_weight: float = 0.1  # l_f; 0 turns the feature discriminator off
    pixel_weight: float = 0.1  # l_p; 0 turns the pixel discriminator off
    detail_share: float = 0.75  # share of each head's channels judged for detail (the rest: temporal); AdcVSR's 75/25
    adversarial_loss: str = "hinge"
    r1_weight: float = 0.1  # R1 penalty on the discriminators' real inputs
    real: str = "teacher"
    feature_sigma: float = 0.5  # sigma_d the trunk sees; 0: each sample's training sigma (timestep_sampling)
    feature_blocks: int = 8  # k: DiT blocks in the feature trunk (at most the DiT's)
    head_width: int = 256  # channels of a head after its input projection
    pixel_width: int = 64  # channels of the pixel trunk's first conv
    pixel_crop: int = 16  # latent pixels (each side) decoded for the pixel discriminator; 0: the whole latent
    discriminator_lr: float = 1e-4

    def __post_init__(self):
        if self.adversarial_loss not in ADVERSARIAL_LOSSES:
            raise ValueError(f"unknown adversarial loss {self.adversarial_loss!r}; use one of {ADVERSARIAL_LOSSES}")
        if self.real not in REAL_TARGETS:
            raise ValueError(f"unknown real target {self.real!r}; use one of {REAL_TARGETS}")
        if self.teacher_steps < 2:
            raise ValueError(f"the teacher must sample in at least 2 steps (got {self.teacher_steps}): a 1-step "
                             "teacher is what the student already is")
        if not 0 < self.detail_share < 1:
            raise ValueError(f"detail_share must be between 0 and 1 (got {self.detail_share}); 0.75 is AdcVSR's")
        if not 0 <= self.feature_sigma <= 1:
            raise ValueError(f"feature_sigma must be in [0, 1] (got {self.feature_sigma})")
        weights = (self.teacher_weight, self.hr_weight, self.feature_weight, self.pixel_weight, self.r1_weight)
        if min(weights) < 0 or self.teacher_weight + self.hr_weight == 0:
            raise ValueError("loss weights must be >= 0, with teacher_weight or hr_weight above 0")
        if self.feature_blocks < 1 or self.head_width < 2 or self.pixel_width < 1 or self.pixel_crop < 0:
            raise ValueError("feature_blocks, head_width, pixel_width must be positive and pixel_crop >= 0")

    def to_dict(self):
        return asdict(self)

    def weight(self, name):
        return {"feature": self.feature_weight, "pixel": self.pixel_weight}[name]


# What each DistillConfig field means, for the node's tooltips and the CLI's help.
SETTING_HELP = {
    "teacher_steps": "steps of the teacher's sampler (N >= 2): the quality the one-step student is taught",
    "teacher_shift": "sampling shift of the teacher's schedule (as the sampler's shift)",
    "teacher_weight": "weight of the student's latent MSE to the teacher's N-step output",
    "hr_weight": "weight of the student's latent MSE to the HR clip's latent (0: off)",
    "feature_weight": "weight of the feature-domain adversarial loss (frozen DiT blocks as the trunk; 0: off)",
    "pixel_weight": "weight of the pixel-domain adversarial loss (decoded frames; 0: off)",
    "detail_share": "share of each discriminator head's channels judging detail, the rest temporal consistency "
                    "(AdcVSR's best: 0.75)",
    "adversarial_loss": "hinge or non_saturating",
    "r1_weight": "R1 penalty on the discriminators' gradients at real inputs (0: off)",
    "real": "what the discriminators learn as real: the teacher's output (distillation) or the HR latent",
    "feature_sigma": "noise level at which the DiT trunk sees real and fake (0: each sample's training sigma)",
    "feature_blocks": "DiT blocks in the feature discriminator's frozen trunk (at most the DiT's)",
    "head_width": "channels of each discriminator head",
    "pixel_width": "channels of the pixel discriminator's first conv",
    "pixel_crop": "latent pixels per side decoded for the pixel discriminator (centre crop; 0: all; decoding "
                  "costs memory)",
    "discriminator_lr": "AdamW learning rate of both discriminators (betas 0, 0.99)",
}


# --- the discriminators ------------------------------------------------------------------------------------------

class DualHead(nn.Module):
    """Detail and temporal logits of a feature map [B, C, T, H, W]: a 1x1x1 projection to `width` channels, split
    detail_share : 1 - detail_share. Detail: per-frame 3x3 convs. Temporal: differences of consecutive frames, then
    a 1D conv over time (None for a single frame: nothing to be consistent with)."""

    def __init__(self, channels, width, detail_share):
        super().__init__()
        self.detail_channels = min(width - 1, max(1, round(width * detail_share)))
        temporal = width - self.detail_channels
        self.project = nn.Conv3d(channels, width, 1)
        self.detail = nn.Sequential(nn.SiLU(), nn.Conv3d(self.detail_channels, self.detail_channels, (1, 3, 3),
                                                         padding=(0, 1, 1)),
                                    nn.SiLU(), nn.Conv3d(self.detail_channels, 1, 1))
        self.temporal = nn.Sequential(nn.SiLU(), nn.Conv3d(temporal, temporal, (3, 1, 1), padding=(1, 0, 0)),
                                      nn.SiLU(), nn.Conv3d(temporal, 1, 1))

    def forward(self, features):
        detail, temporal = self.project(features).split(
            [self.detail_channels, self.project.out_channels - self.detail_channels], dim=1)
        consistency = self.temporal(temporal.diff(dim=2)) if features.shape[2] > 1 else None
        return self.detail(detail), consistency


class PixelDiscriminator(nn.Module):
    """Frames [B, 3, T, H, W] in [-1, 1] -> dual-head logits: two strided per-frame convs (1/4 resolution), then a
    DualHead."""

    def __init__(self, width, head_width, detail_share):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv3d(3, width, (1, 4, 4), stride=(1, 2, 2), padding=(0, 1, 1)),
                                   nn.LeakyReLU(0.2),
                                   nn.Conv3d(width, 2 * width, (1, 4, 4), stride=(1, 2, 2), padding=(0, 1, 1)),
                                   nn.LeakyReLU(0.2))
        self.head = DualHead(2 * width, head_width, detail_share)

    def forward(self, frames):
        return self.head(self.trunk(frames))


def new_discriminators(config, feature_channels, seed=0):
    """{name: module} of the discriminators with a weight above 0, seeded (a fresh run is reproducible)."""
    builders = {"feature": lambda: DualHead(feature_channels, config.head_width, config.detail_share),
                "pixel": lambda: PixelDiscriminator(config.pixel_width, config.head_width, config.detail_share)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.ModuleDict({name: build() for name, build in builders.items() if config.weight(name) > 0})


# --- the losses --------------------------------------------------------------------------------------------------

def _per_sample_mean(logits):
    return logits.float().flatten(1).mean(dim=1)


def _heads(logits):
    return [head for head in logits if head is not None]


def generator_loss(logits, kind):
    """[B]: the generator's adversarial loss on fake logits, summed over the heads."""
    per_head = [-_per_sample_mean(head) if kind == "hinge" else _per_sample_mean(F.softplus(-head))
                for head in _heads(logits)]
    return sum(per_head)


def discriminator_loss(real_logits, fake_logits, kind):
    """[B]: the discriminator's loss, summed over the heads."""
    total = 0
    for real, fake in zip(real_logits, fake_logits):
        if real is None:
            continue
        if kind == "hinge":
            total = total + _per_sample_mean(F.relu(1 - real)) + _per_sample_mean(F.relu(1 + fake))
        else:
            total = total + _per_sample_mean(F.softplus(-real)) + _per_sample_mean(F.softplus(fake))
    return total


def r1_penalty(logits, inputs):
    """[B]: |d(sum of real logits)/d input|^2 per sample (R1), with a graph so it can be trained through."""
    score = sum(head.float().sum() for head in _heads(logits))
    (gradient,) = torch.autograd.grad(score, inputs, create_graph=True)
    return gradient.float().pow(2).flatten(1).sum(dim=1)


def latent_mse(a, b):
    return (a.float() - b.float()).pow(2).flatten(1).mean(dim=1)


def centre_crop(latent, size):
    """The centre `size` x `size` latent pixels of [B, C, T, h, w] (all of it where smaller, or size 0)."""
    if size == 0:
        return latent
    h, w = latent.shape[-2:]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return latent[..., top:top + size, left:left + size]


# --- the objective -----------------------------------------------------------------------------------------------

def one_step(denoise, lr_latent, noise, shift):
    """The student's output: the sampler at 1 step from sigma 1 (its clean estimate at the LR latent)."""
    return sample_vsr(denoise, lr_latent, noise, flow_sigmas(1, shift))


def regression(student, teacher_latent, hr_latent, config):
    """[B]: w_T |x_s - x_T|^2 + w_HR |x_s - z_HR|^2 (a zero weight adds nothing, not 0 * a value)."""
    loss = config.teacher_weight * latent_mse(student, teacher_latent)
    if config.hr_weight:
        loss = loss + config.hr_weight * latent_mse(student, hr_latent)
    return loss


class Distillation:
    """The distillation objective: `teacher` is the teacher's denoise(x, sigma, lr, estimate); `trunk(latent,
    sigma)` the frozen DiT's first blocks as features [B, C, t, h, w]; `decode(latent)` frames [B, 3, T, H, W] in
    [-1, 1] with gradients. Only the discriminators whose weight is above 0 need theirs."""

    def __init__(self, teacher, config: DistillConfig, discriminators, trunk=None, decode=None):
        self.teacher, self.config, self.discriminators = teacher, config, discriminators
        self.inputs = {"feature": trunk, "pixel": decode}
        self.optimizer = torch.optim.AdamW(discriminators.parameters(), lr=config.discriminator_lr,
                                           betas=(0.0, 0.99), weight_decay=0.0) if len(discriminators) else None
        self.scaler = None  # made by the first update, for the trainer's device and precision
        self.loss_scale = None  # a resumed fp16 run's scale, given to that scaler
        self.pending = []  # (real, fake inputs, noise, sigma_d, loss parts) of this step's forward passes
        self.history = {}  # name -> [value per optimizer step]

    def teacher_output(self, lr_latent, noise):
        with torch.no_grad():
            return sample_vsr(self.teacher, lr_latent, noise,
                              flow_sigmas(self.config.teacher_steps, self.config.teacher_shift)).float()

    def discriminator_input(self, name, latent, noise, sigma):
        """What discriminator `name` sees of a clean latent: trunk features at sigma_d, or decoded frames."""
        if name == "feature":
            s = sigma.to(latent).reshape(-1, *([1] * (latent.ndim - 1)))
            return self.inputs["feature"](s * noise.to(latent) + (1 - s) * latent, sigma)
        return self.inputs["pixel"](centre_crop(latent, self.config.pixel_crop))

    def discriminator_sigma(self, sigma):
        return sigma if self.config.feature_sigma == 0 else torch.full_like(sigma, self.config.feature_sigma)

    def __call__(self, denoise, hr_latent, lr_latent, noise, sigma, config):
        """[B]: the generator loss; remembers real and fake for this step's discriminator update."""
        student = one_step(denoise, lr_latent, noise, self.config.teacher_shift).float()
        target = self.teacher_output(lr_latent, noise)
        loss = regression(student, target, hr_latent, self.config)
        parts = {"regression": loss.detach()}
        sigma_d = self.discriminator_sigma(sigma)
        fake_inputs = {}  # what each discriminator saw of the fake: its update reuses it (the trunk is frozen)
        for name, discriminator in self.discriminators.items():
            discriminator.requires_grad_(False)  # the generator's pass trains the adapter only
            fake_in = self.discriminator_input(name, student, noise, sigma_d)
            fake_inputs[name] = fake_in.detach()
            adversarial = generator_loss(discriminator(fake_in), self.config.adversarial_loss)
            parts[f"{name}_generator"] = adversarial.detach()
            loss = loss + self.config.weight(name) * adversarial
        real = target if self.config.real == "teacher" else hr_latent.float()
        self.pending.append((real, fake_inputs, noise, sigma_d, parts))
        return loss

    def validation(self, denoise, hr_latent, lr_latent, noise, sigma, config):
        """[B]: latent MSE of the student's one step to the teacher's N steps (what distillation is for)."""
        student = one_step(denoise, lr_latent, noise, self.config.teacher_shift)
        return latent_mse(student, self.teacher_output(lr_latent, noise))

    def update(self, trainer):
        """One optimizer step of the discriminators on the passes of the trainer's last step; returns the step's
        mean of every loss part (generator parts included), summed over the trainer's processes."""
        pending, self.pending = self.pending, []
        count = sum(entry[0].shape[0] for entry in pending) * trainer.world.size
        sums = {name: value.double().sum() for name, value in _merge([entry[4] for entry in pending]).items()}
        if self.optimizer is not None:
            if self.scaler is None:
                self.scaler = torch.amp.GradScaler(trainer.device.type, enabled=trainer.autocast_dtype == torch.float16)
                if self.loss_scale and self.scaler.is_enabled():
                    self.scaler.update(float(self.loss_scale))
            self.discriminators.requires_grad_(True)
            self.optimizer.zero_grad(set_to_none=False)
            for real, fake_inputs, noise, sigma_d, _ in pending:
                with torch.autocast(trainer.device.type, dtype=trainer.autocast_dtype,
                                    enabled=trainer.autocast_dtype is not None):
                    losses = self._discriminator_losses(real, fake_inputs, noise, sigma_d)
                self.scaler.scale(sum(losses.values()).sum() / count).backward()
                for name, value in losses.items():
                    sums[name] = sums.get(name, 0) + value.detach().double().sum()
            parameters = list(self.discriminators.parameters())
            for parameter in parameters:
                if parameter.grad is None:
                    parameter.grad = torch.zeros_like(parameter)
            trainer.world.sum_([p.grad for p in parameters])
            self.scaler.step(self.optimizer)
            self.scaler.update()
        names = sorted(sums)
        totals = torch.stack([sums[name].to(trainer.parameters[0].device) for name in names])
        trainer.world.sum_([totals])
        result = {name: float(total) / count for name, total in zip(names, totals)}
        broken = [name for name, value in result.items() if not math.isfinite(value)]
        if broken:
            raise FloatingPointError(f"distillation loss {', '.join(broken)} became non-finite at step "
                                     f"{trainer.step_count}: lower the learning rates or the adversarial weights")
        for name, value in result.items():
            self.history.setdefault(name, []).append(value)
        return result

    def _discriminator_losses(self, real, fake_inputs, noise, sigma_d):
        losses = {}
        for name, discriminator in self.discriminators.items():
            with torch.no_grad():
                real_in = self.discriminator_input(name, real, noise, sigma_d)
            real_in.requires_grad_(self.config.r1_weight > 0)
            real_logits = discriminator(real_in)
            loss = discriminator_loss(real_logits, discriminator(fake_inputs[name]), self.config.adversarial_loss)
            if self.config.r1_weight > 0:
                loss = loss + self.config.r1_weight / 2 * r1_penalty(real_logits, real_in)
            losses[f"{name}_discriminator"] = loss
        return losses

    # -- checkpoint state: plain tensors and JSON-able values
    def state_tensors(self):
        tensors = {f"discriminator.{name}": value.detach().cpu().clone()
                   for name, value in self.discriminators.state_dict().items()}
        if self.optimizer is not None:
            tensors.update(optimizer_state_tensors(self.optimizer, "discriminator_optimizer"))
        for name, values in self.history.items():
            tensors[f"history.{name}"] = torch.tensor(values, dtype=torch.float64)
        return tensors

    def state_metadata(self):
        enabled = self.scaler is not None and self.scaler.is_enabled()
        return {"distill": self.config.to_dict(), "loss_scale": self.scaler.get_scale() if enabled else self.loss_scale}

    def load_state(self, tensors, metadata):
        self.discriminators.load_state_dict({key.split(".", 1)[1]: value for key, value in tensors.items()
                                             if key.startswith("discriminator.")})
        if self.optimizer is not None:
            load_optimizer_state(self.optimizer, tensors, "discriminator_optimizer")
        self.history = {key.split(".", 1)[1]: [float(v) for v in value] for key, value in tensors.items()
                        if key.startswith("history.")}
        self.loss_scale = metadata.get("loss_scale")


def _merge(parts):
    """{name: [B] tensors} of several passes -> {name: one tensor of every sample}."""
    names = parts[0].keys() if parts else ()
    return {name: torch.cat([part[name].reshape(-1) for part in parts]) for name in names}


# --- what a step costs (estimates from the planner's formulas, core/memory.py) -----------------------------------

def step_calls(config):
    """Model calls per sample of one step: teacher and student DiT forwards, and feature-trunk forwards (the fake in
    the generator's pass, reused by the discriminator's update, and the real); the student's and the generator's
    trunk call are also differentiated."""
    return {"teacher": config.teacher_steps, "student": 1, "trunk": 2 if config.feature_weight > 0 else 0}


ADAPTER_BYTES_PER_PARAMETER = 20  # float32 student weights, gradient, AdamW's two moments, and the teacher's weights


def step_estimate(signature, config, latent_frames, latent_h, latent_w, adapter_parameters, dtype_bytes=2,
                  gradient_checkpointing=True, **geometry):
    """(DiT matmul FLOPs, device bytes) of one step on one clip: the calls of `step_calls` at memory.dit_step_flops
    each, a backward counted as two forwards (three with gradient checkpointing's recompute), the trunk as its
    share of the blocks; bytes = DiT weights + one call's activation peak + the block inputs kept for backward
    (all of each block's activations without checkpointing) + the adapters' training state. The decoder and the
    heads are left out: the pixel discriminator decodes a small crop. `geometry`: memory.py's options (ffn_dim,
    ...). An estimate, not a measurement."""
    calls = step_calls(config)
    adapted = dit_step_flops(signature, latent_frames, latent_h, latent_w, adapter_mode="direct",
                             ffn_dim=geometry.get("ffn_dim"))
    blocks = min(config.feature_blocks, signature.num_layers)
    trunk = dit_step_flops(signature, latent_frames, latent_h, latent_w, ffn_dim=geometry.get("ffn_dim")) \
        * blocks / signature.num_layers
    backward = 3 if gradient_checkpointing else 2
    differentiated_trunk = 1 if calls["trunk"] else 0  # the generator's pass through the trunk
    flops = (calls["teacher"] + calls["student"] * (1 + backward)) * adapted \
        + (calls["trunk"] + differentiated_trunk * backward) * trunk
    peak = dit_step_bytes(signature, latent_frames, latent_h, latent_w, dtype_bytes, **geometry)
    kept_per_block = dit_tokens(signature, latent_frames, latent_h, latent_w) * signature.dim * dtype_bytes
    kept = kept_per_block * signature.num_layers if gradient_checkpointing else peak * signature.num_layers
    adapters = adapter_parameters * ADAPTER_BYTES_PER_PARAMETER
    return flops, dit_weight_bytes(signature, dtype_bytes, geometry.get("ffn_dim")) + peak + kept + adapters
