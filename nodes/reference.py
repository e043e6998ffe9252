"""InfVSR's reference encoder in ComfyUI: RAM's Swin-L with DAPE merged (core/reference_encoder.py), read from the
published .pth files or converted .safetensors, held by a ModelPatcher so ComfyUI loads, offloads and frees it as
it does any model."""
import os

import comfy.model_management
import comfy.model_patcher
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .core.pickle_file import is_pickle_name, read_tensor_pickle, tensor_dict
from .core.reference_encoder import ReferenceFileRefused, build_reference_encoder

SOCKET_TYPE = "LITEVSR_REFERENCE"  # the ComfyUI socket type that carries a LoadedReferenceEncoder


def read_weights(path, pickle_key=None):
    """{name: tensor} of a .pth/.ckpt (through the weights-only reader; `pickle_key`: the entry holding the state
    dict) or of a .safetensors file (flat, as converted)."""
    name = os.path.basename(path)
    if is_pickle_name(path):
        return tensor_dict(read_tensor_pickle(path), name, pickle_key)
    if not str(path).lower().endswith(".safetensors"):
        raise ReferenceFileRefused(f"{name}: only .pth/.ckpt and .safetensors files are read.")
    try:
        return load_file(path)
    except SafetensorError as error:
        raise ReferenceFileRefused(f"{name} is not a readable safetensors file ({error}).") from None


def encoder_dtype(device):
    """bf16 where the device has it, else fp16, float32 on the CPU: ComfyUI's own tests of the device."""
    if comfy.model_management.should_use_bf16(device):
        return torch.bfloat16
    if comfy.model_management.should_use_fp16(device):
        return torch.float16
    return torch.float32


class LoadedReferenceEncoder:
    """The encoder under ComfyUI's memory management; `encode(frame)` gives the DiT context."""

    def __init__(self, module):
        load_device = comfy.model_management.get_torch_device()
        offload_device = comfy.model_management.unet_offload_device()
        module.to(device=offload_device, dtype=encoder_dtype(load_device))
        self.patcher = comfy.model_patcher.ModelPatcher(module, load_device=load_device,
                                                        offload_device=offload_device)

    @property
    def tokens(self):
        return self.patcher.model.tokens

    def encode(self, frame):
        """frame [H, W, 3] or [1, 3, H, W], values 0..1 -> context [1, tokens, 512] float32 on ComfyUI's
        intermediate device (the CPU, unless --gpu-only)."""
        # a module ComfyUI cannot cast layer by layer must be on the device whole
        comfy.model_management.load_models_gpu([self.patcher], force_full_load=True)
        context = self.patcher.model.context(frame)
        return context.to(comfy.model_management.intermediate_device())


def load_reference_encoder(ram_path, dape_path):
    """LoadedReferenceEncoder of RAM's `ram_swin_large_14m.pth` (state dict under "model") and `DAPE.pth`, or of
    their .safetensors conversions."""
    ram = read_weights(ram_path, pickle_key="model")
    dape = read_weights(dape_path)
    module = build_reference_encoder(ram, dape, os.path.basename(ram_path), os.path.basename(dape_path))
    return LoadedReferenceEncoder(module)
