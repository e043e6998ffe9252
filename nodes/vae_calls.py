"""Calling a ComfyUI VAE's model directly, as the VAE's own encode/decode calls it.

For callers that step the model themselves (decode tiles, causal chunks): ComfyUI's VAE.encode/decode would redo
the load and the memory estimate on every call and add an OOM fallback of their own (tiling in time, which restarts
the causal cache). These helpers do the parts that stay: the load with ComfyUI's estimate, the VAE's GPU made the
current one, and the VAE's own input/output mappings.
"""
from contextlib import nullcontext

import comfy.model_management
import torch


def load_for_decode(vae, latent_shape):
    """Loads `vae` to decode latents of `latent_shape` [B, C, T, h, w], freeing what ComfyUI estimates it needs."""
    if hasattr(vae, "prepare_decode"):  # newer ComfyUI: its own entry point for decoders called directly
        vae.prepare_decode(tuple(latent_shape))
    else:
        load_with_memory(vae, vae.memory_used_decode(tuple(latent_shape), vae.vae_dtype))


def load_for_encode(vae, pixel_shape):
    """Loads `vae` to encode pixels of `pixel_shape` [B, 3, T, H, W], as VAE.encode does."""
    load_with_memory(vae, vae.memory_used_encode(tuple(pixel_shape), vae.vae_dtype))


def load_with_memory(vae, memory_required):
    comfy.model_management.load_models_gpu([vae.patcher], memory_required=memory_required,
                                            force_full_load=getattr(vae, "disable_offload", False))


def on_vae_device(vae):
    """The VAE's GPU as the current one for the call (newer ComfyUI: custom kernels read it), as VAE.decode does."""
    device_context = getattr(comfy.model_management, "cuda_device_context", None)
    return nullcontext() if device_context is None else device_context(vae.device)


def video_pixels_in(vae, frames):
    """IMAGE frames [T, H, W, 3] in 0..1 -> the model's input [1, 3, T, H, W] on the VAE's device and dtype, cropped
    and mapped as VAE.encode does."""
    pixels = vae.vae_encode_crop_pixels(frames).movedim(-1, 0).unsqueeze(0)
    return vae.process_input(pixels).to(vae.vae_dtype).to(vae.device)


def latent_out(vae, latent):
    """The model's latent as VAE.encode returns it: on the VAE's output device, in its output dtype."""
    dtype = vae.vae_output_dtype() if hasattr(vae, "vae_output_dtype") else torch.float32  # older ComfyUI: float32
    return latent.to(vae.output_device).to(dtype)


def frames_out(vae, pixels):
    """The model's output [1, 3, T, H, W] -> CPU float32 frames [T, H, W, 3] in 0..1 through the VAE's
    process_output (a copy: newer ComfyUI maps in place)."""
    return vae.process_output(pixels.to("cpu", torch.float32, copy=True)).movedim(1, -1)[0]
