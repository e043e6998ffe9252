"""InfVSR's DiT as a stock ComfyUI MODEL.

InfVSR is a Wan2.1 T2V 1.3B with the original key names, except that its context is 512-wide DAPE visual tokens:
`text_embedding.0` is Linear(512, dim). ComfyUI's Wan detection fixes the context width at umt5's 4096, so 'Load
Diffusion Model' builds the wrong layer and fails on that one tensor. This loader takes ComfyUI's own detection and
changes only the context width, then follows comfy.sd.load_diffusion_model_state_dict's steps with ComfyUI's own
functions and classes, so the MODEL is what the stock loader would have made of it."""
import os

import torch

import comfy.ldm.wan.model
import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.utils

from .core.geometry import INFVSR_CONTEXT_DIM
from .core.infvsr_files import DIT_CONTEXT_KEY
from .core.pickle_file import read_tensor_pickle, tensor_dict

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")  # the names comfy.utils.load_torch_file reads as safetensors
WEIGHT_DTYPES = {"default": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                 "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


class NotInfVSR(ValueError):
    pass


def read_state_dict(path):
    """safetensors through ComfyUI; anything else is a pickle, read only by the weights-only reader."""
    if path.lower().endswith(SAFETENSORS_SUFFIXES):
        return comfy.utils.load_torch_file(path)
    return tensor_dict(read_tensor_pickle(path), os.path.basename(path))


def load_infvsr_dit(path, dtype=None, disable_dynamic=False):
    """The MODEL of InfVSR's DiT file (its .ckpt, or the safetensors tools/infvsr.py converts it to). dtype: the
    weights' dtype, None for ComfyUI's choice. disable_dynamic: as comfy.sd.load_diffusion_model's (newer ComfyUI
    passes it when it reloads the file through cached_patcher_init)."""
    patcher = infvsr_dit_from_state_dict(read_state_dict(path), os.path.basename(path), dtype, disable_dynamic)
    # newer ComfyUI reloads the file through this for deep copies (training) and Dynamic VRAM; older ones ignore it
    patcher.cached_patcher_init = (load_infvsr_dit, (path, dtype))
    return patcher


def infvsr_dit_from_state_dict(sd, name, dtype=None, disable_dynamic=False):
    """A ModelPatcher over ComfyUI's own Wan2.1 model of an InfVSR DiT state dict (keys as released, or under a
    checkpoint prefix ComfyUI recognises); `name` names the source in errors."""
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    sd = comfy.utils.state_dict_prefix_replace(sd, {prefix: ""}, filter_keys=True) or sd
    config = comfy.model_detection.model_config_from_unet(sd, "")
    context = sd.get(DIT_CONTEXT_KEY)
    if config is None or config.unet_config.get("image_model") != "wan2.1" or context is None:
        raise NotInfVSR(f"{name} is not a Wan2.1 DiT, so not InfVSR's.")
    if context.shape[1] != INFVSR_CONTEXT_DIM:
        raise NotInfVSR(f"{name} is a Wan DiT reading {context.shape[1]}-wide text context, not InfVSR's "
                        f"{INFVSR_CONTEXT_DIM}-wide visual tokens: load it with 'Load Diffusion Model'.")
    config.unet_config["text_dim"] = context.shape[1]

    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    supported = list(config.supported_inference_dtypes)
    if dtype is None:
        dtype = comfy.model_management.unet_dtype(model_params=comfy.utils.calculate_parameters(sd),
                                                  supported_dtypes=supported,
                                                  weight_dtype=comfy.utils.weight_dtype(sd))
    config.set_inference_dtype(dtype, comfy.model_management.unet_manual_cast(dtype, load_device, supported))

    model = config.get_model(sd, "")
    # ComfyUI >= 0.1x: CoreModelPatcher is the Dynamic VRAM patcher when that is on, and then owns the weights
    patcher_class = comfy.model_patcher.ModelPatcher if disable_dynamic else \
        getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
    patcher = patcher_class(model, load_device=load_device, offload_device=offload_device)
    if not comfy.model_management.is_device_cpu(offload_device):
        model.to(offload_device)
    if getattr(patcher, "is_dynamic", lambda: False)():  # Dynamic VRAM keeps the given tensors as the weights
        model.load_model_weights(sd, "", assign=True)
    else:
        model.load_model_weights(sd, "")
    return patcher


def is_infvsr(model):
    """Whether a MODEL is InfVSR's DiT: a Wan whose context embedding takes 512-wide visual tokens."""
    dit = getattr(getattr(model, "model", None), "diffusion_model", None)
    return isinstance(dit, comfy.ldm.wan.model.WanModel) and dit.text_embedding[0].in_features == INFVSR_CONTEXT_DIM
