"""ComfyUI side of one-step distillation: the teacher adapter, the frozen DiT as the feature discriminator's trunk
and the VAE's decoder for the pixel discriminator, bound to a training run's frozen backbone (`train_adapter` calls
`bind`). The math is core/distill.py; the run loop is training_run.py's, unchanged.

The trunk runs the stock Wan forward with a block patch on blocks 0..k-1 ("dit", "double_block", i): block k-1
hands its output tokens out by raising, so blocks k.. are never computed (no second network, no copy of the DiT).
"""
import copy
import os
from dataclasses import dataclass

import torch
from einops import rearrange

from .backbone import (attach_adapter, backbone_signature, checkpointed, direct_call_options, make_denoiser,
                       per_sample_sigmas)
from .core.adapter_file import distillation_metadata
from .core.distill import DistillConfig, Distillation, new_discriminators
from .model_files import sha256_of
from .training_run import thaw_inference_tensors


class _TrunkOutput(Exception):
    def __init__(self, tokens):
        super().__init__("feature trunk output")
        self.tokens = tokens


class TrunkBlock:
    """Block i of the trunk: the original block (recomputed in backward when checkpointing); the last one stops the
    forward with its output."""

    def __init__(self, last, checkpoint):
        self.last, self.checkpoint = last, checkpoint

    def __call__(self, args, extra):
        block = extra["original_block"]
        out = (checkpointed(block) if self.checkpoint else block)(args)
        if self.last:
            raise _TrunkOutput(out["img"])
        return out


def feature_trunk(backbone, context, blocks, checkpoint=False):
    """trunk(latent, sigma) -> features [B, dim, t, h, w]: the frozen DiT's first `blocks` blocks (no adapter) at
    sigma, as the stock forward computes them."""
    signature = backbone_signature(backbone)
    blocks = min(blocks, signature.num_layers)
    options = direct_call_options(backbone)
    options["patches_replace"] = {"dit": {("double_block", i): TrunkBlock(i == blocks - 1, checkpoint)
                                          for i in range(blocks)}}
    device = backbone.load_device
    text = context.to(device)
    patch = signature.patch_size

    def trunk(latent, sigma):
        batch = latent.shape[0]
        sigmas = per_sample_sigmas(sigma, batch, device)
        try:
            backbone.model.apply_model(latent.to(device), sigmas, c_crossattn=text.expand(batch, -1, -1),
                                       transformer_options=dict(options, sigmas=sigmas))
        except _TrunkOutput as output:
            t, h, w = (-(-size // step) for size, step in zip(latent.shape[2:], patch))  # Wan pads to the patch
            return rearrange(output.tokens, "b (t h w) d -> b d t h w", t=t, h=h, w=w)
        raise RuntimeError("the feature trunk's last block was never called: another node replaced it")

    return trunk


def pixel_decoder(vae, model, device):
    """decode(latent) -> frames [B, 3, T, H, W] in [-1, 1] with gradients: a trainable-graph copy of the VAE's model
    (its weights ordinary tensors, frozen), fed the MODEL's latents mapped into the VAE's space."""
    decoder = copy.deepcopy(vae.first_stage_model)
    thaw_inference_tensors(decoder)
    decoder.requires_grad_(False)
    decoder.to(device=device, dtype=torch.float32)
    # The MODEL's latent format maps its latents into the VAE's space; a MODEL loaded by a node (under inference
    # mode) holds that map's mean and std as inference tensors, which autograd refuses to save: a copy of the format
    # with ordinary clones of them.
    latent_format = copy.copy(model.model.latent_format)
    for name, value in list(vars(latent_format).items()):
        if torch.is_tensor(value) and value.is_inference():
            setattr(latent_format, name, value.clone())
    to_vae_space = latent_format.process_out

    def decode(latent):
        return decoder.decode(to_vae_space(latent.float()))

    return decode


@dataclass
class DistillObjective:
    """What a distillation run adds to training: the frozen teacher adapter (and its text context), the settings;
    `bind` makes the core objective once the run's frozen backbone exists."""

    teacher: object  # StateAwareAdapter
    teacher_context: object  # [1, L, text_dim] or None (the run's context)
    config: DistillConfig
    teacher_path: str = None  # the teacher's file, recorded in the student's metadata (student_metadata)

    def bind(self, run):
        """(core Distillation, patchers to keep loaded) on `run` (training_run.BoundRun)."""
        context = run.context if self.teacher_context is None else self.teacher_context
        teacher = attach_adapter(run.backbone, self.teacher, context)
        teacher_denoise = make_denoiser(teacher)
        channels = backbone_signature(run.backbone).dim
        discriminators = new_discriminators(self.config, channels, run.seed).to(run.device)
        trunk = decode = None
        if self.config.feature_weight > 0:
            trunk = feature_trunk(run.backbone, run.context, self.config.feature_blocks, run.gradient_checkpointing)
        if self.config.pixel_weight > 0:
            decode = pixel_decoder(run.vae, run.backbone, run.device)
        objective = Distillation(teacher_denoise, self.config, discriminators, trunk, decode)
        return objective, [teacher] + teacher.get_nested_additional_models()

    def student_metadata(self):
        """The student file's record: one-step distilled, from which teacher (name and SHA-256) at how many steps."""
        return distillation_metadata(1, os.path.basename(self.teacher_path), sha256_of(self.teacher_path),
                                     self.config.teacher_steps)
