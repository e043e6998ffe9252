"""ComfyUI side of adapter training: the frozen MODEL and VAE become the core trainer's model call and encoder, and
one run loop (resume, checkpoints, validation, progress, interrupts) serves the Train node and tools/train.py.

ComfyUI executes every node under torch.inference_mode(), and weights loaded by an upstream loader are inference
tensors that autograd refuses to save for backward. The run therefore happens inside inference_mode(False), on a
backbone whose weights are ordinary tensors (`frozen_backbone`), with the adapter rebuilt there, and with ComfyUI's
training switches on (`training_mode.py`).
"""
import inspect
from dataclasses import dataclass, field

import torch

import comfy.model_management
import comfy.utils

from .adapters import text_context
from .backbone import attach_adapter, backbone_signature, make_denoiser
from .core.adapter import StateAwareAdapter
from .core.checkpoint import load_checkpoint, resume_step, save_checkpoint
from .core.training import (AdapterTrainer, PairMaker, SegmentCarry, World, segment_objective, validation_loss,
                            validation_set, velocity_loss)
from .pipeline import adapter_memory, context_sigma, lr_encoder
from .training_mode import TrainingUnsupported, comfy_training_mode

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def thaw_inference_tensors(module):
    """Replaces inference-mode parameters/buffers with ordinary clones (same values); returns how many."""
    parameters = dict(module.named_parameters())
    thawed = 0
    for name, tensor in list(parameters.items()) + list(module.named_buffers()):
        if tensor.is_inference():
            if name in parameters:
                comfy.utils.set_attr_param(module, name, tensor.clone())
            else:
                comfy.utils.set_attr(module, name, tensor.clone())
            thawed += 1
    return thawed


def frozen_backbone(model):
    """The MODEL a training run works on, held as core's trainer holds it where ComfyUI can: a deep copy reloaded by
    the loader that made it (`clone(force_deepcopy=True)`, ComfyUI >= 0.1x with a stock loader), created here
    outside inference mode so its weights are ordinary tensors, and the MODEL other nodes hold is never touched;
    under Dynamic VRAM the weights live in ComfyUI's own buffers, so this is the only way. Elsewhere (0.3.x, or a
    MODEL from a loader that cannot reload it) a clone whose inference-tensor weights are swapped for ordinary
    copies of the same values once it is loaded (`thaw_inference_tensors`, a no-op on the deep copy)."""
    if "force_deepcopy" in inspect.signature(model.clone).parameters \
            and getattr(model, "cached_patcher_init", None) is not None:
        return model.clone(force_deepcopy=True)
    if getattr(model, "is_dynamic", lambda: False)():
        raise TrainingUnsupported(
            "This MODEL is held by ComfyUI's Dynamic VRAM and its loader cannot reload it for training: load it with "
            "'Load Diffusion Model', or start ComfyUI with --disable-dynamic-vram.")
    return model.clone()


def autocast_dtype(device, precision):
    """None (fp32) on the CPU; bf16 where the GPU has it, fp16 otherwise, unless a precision is forced."""
    if device.type == "cpu" or precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if comfy.model_management.should_use_bf16(device) else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def check_clip_geometry(dataset, scale, signature, role="training"):
    grid = signature.grid_px
    height, width = dataset.crop_height, dataset.crop_width
    if height % grid or width % grid:
        raise ValueError(f"{role} crop {width}x{height} must be a multiple of {grid} px for the {signature.family} "
                         f"backbone (one DiT token covers {grid} px); e.g. {width - width % grid or grid}x"
                         f"{height - height % grid or grid}")
    if height % scale or width % scale:
        raise ValueError(f"{role} crop {width}x{height} must be divisible by the degradation scale {scale}")


@dataclass
class RunSettings:
    checkpoint_dir: str = None  # None: no checkpoints (and no resume)
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    resume: bool = False
    validation_every: int = 0  # 0: validate only before and after
    validation_clips: int = 1
    gradient_checkpointing: bool = False
    precision: str = "auto"
    run_metadata: dict = field(default_factory=dict)


@dataclass
class RunResult:
    model: object  # the caller's MODEL (a clone) with the trained adapter attached
    adapter: StateAwareAdapter
    context: torch.Tensor
    losses: list  # training loss per optimizer step, from step 1 (a resumed run includes the earlier steps)
    validation: list  # (step, held-out validation loss)
    resumed_from: int = None
    loss_parts: dict = field(default_factory=dict)  # name -> value per step, of an objective that reports parts


@dataclass
class BoundRun:
    """What an objective that needs the run's models (`objective.bind(run)`: distillation) gets: the frozen
    backbone without the adapter, the VAE, the run's text context, device and seed."""
    backbone: object
    vae: object
    context: torch.Tensor
    device: torch.device
    seed: int
    gradient_checkpointing: bool


class Hooks:
    """What the caller wants to hear about; the node reports progress/previews and honours interrupts here."""

    def on_step(self, step, total, loss):
        pass

    def on_validation(self, step, loss, denoise, samples):
        pass

    def check_interrupt(self):
        comfy.model_management.throw_exception_if_processing_interrupted()


def _starting_point(adapter, context, settings, signature, steps):
    """(adapter copy, context, checkpoint state or None): resume from the newest checkpoint when asked and present."""
    step = resume_step(settings.checkpoint_dir, settings.resume, steps) if settings.checkpoint_dir else None
    if step is not None:
        saved, saved_context, tensors, trainer_state, _ = load_checkpoint(settings.checkpoint_dir, step, signature)
        return saved, saved_context if saved_context is not None else context, (step, tensors, trainer_state)
    fresh = StateAwareAdapter(adapter.config)
    fresh.load_state_dict({name: value.clone() for name, value in adapter.state_dict().items()})
    return fresh, context, None


def train_adapter(model, vae, dataset, degradation, scale, config, adapter, context=None, settings=None,
                  validation_dataset=None, world=None, hooks=None, objective=velocity_loss):
    """Trains a copy of `adapter` on the frozen `model`; returns a RunResult. Only the adapter's tensors change.
    `objective`: the loss per sample (core/training.py; the velocity loss unless a caller brings another), or an
    object whose `bind(BoundRun)` makes one from the run's models and names the patchers it keeps loaded."""
    settings, world, hooks = settings or RunSettings(), world or World(), hooks or Hooks()
    signature = backbone_signature(model)
    check_clip_geometry(dataset, scale, signature)
    if validation_dataset is not None:  # refused before any training step, not at the first validation
        check_clip_geometry(validation_dataset, scale, signature, role="validation")
    with torch.inference_mode(False), torch.enable_grad(), comfy_training_mode():
        if context is None:
            context = text_context(signature)  # the zero context, with its warning
        adapter, context, resume_state = _starting_point(adapter, context.clone(), settings, signature,
                                                              config.steps)
        backbone = frozen_backbone(model)
        backbone.model.requires_grad_(False)
        patched = attach_adapter(backbone, adapter, context)
        denoise = make_denoiser(patched, gradient_checkpointing=settings.gradient_checkpointing)
        device = patched.load_device
        resident = [patched] + patched.get_nested_additional_models()
        if config.segments == 2:
            objective = segment_objective(objective, SegmentCarry(context_sigma(patched), adapter_memory(patched)))
        if hasattr(objective, "bind"):
            objective, more_resident = objective.bind(BoundRun(backbone, vae, context, torch.device(device),
                                                               config.seed, settings.gradient_checkpointing))
            resident += more_resident
        thaw_inference_tensors(patched.model)  # after loading: the weights the device really holds
        vae_encode = lr_encoder(vae, model)

        def encode(frames):
            latent = vae_encode(frames)
            comfy.model_management.load_models_gpu(resident)  # the VAE may have pushed the DiT out of VRAM
            return latent

        pairs = PairMaker(dataset, degradation, scale, encode, config)
        trainer = AdapterTrainer(adapter, denoise, pairs, config, device, world,
                                 autocast_dtype(torch.device(device), settings.precision), objective)
        if resume_state is not None:
            trainer.load_state(resume_state[1], resume_state[2])
        validation = PairMaker(validation_dataset or dataset, degradation, scale, encode, config)
        samples = validation_set(validation, settings.validation_clips)
        history = []

        def validate():
            loss = validation_loss(denoise, samples, config, device, objective)
            history.append((trainer.step_count, loss))
            hooks.on_validation(trainer.step_count, loss, denoise, samples)

        def checkpoint():
            if settings.checkpoint_dir and world.rank == 0:
                save_checkpoint(settings.checkpoint_dir, trainer, context, settings.run_metadata,
                                settings.keep_checkpoints)

        validate()
        while trainer.step_count < config.steps:
            loss = trainer.step()
            step = trainer.step_count
            last = step == config.steps
            if last or (settings.checkpoint_every and step % settings.checkpoint_every == 0):
                checkpoint()
            try:
                hooks.on_step(step, config.steps, loss)
                hooks.check_interrupt()
            except BaseException:  # interrupted: keep every finished step, so resume loses nothing
                checkpoint()
                raise
            if not last and settings.validation_every and step % settings.validation_every == 0:
                validate()
        validate()
        adapter.requires_grad_(False)
        for parameter in adapter.parameters():
            parameter.grad = None
    # The trained adapter goes out on the MODEL the caller gave (a light clone): the training copy is dropped.
    return RunResult(attach_adapter(model, adapter, context), adapter, context, list(trainer.losses), history,
                     resume_state[0] if resume_state is not None else None, dict(getattr(objective, "history", {})))
