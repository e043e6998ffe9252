"""The causal DiT call (InfVSR) on a stock ComfyUI Wan MODEL, through ComfyUI's own hooks, no monkey-patching:

- every block is replaced (`"dit", "double_block", i`) by a patch that runs the original block with a one-shot
  `optimized_attention_override` in its transformer_options: the block's first attention call is its
  self-attention (Wan calls cross-attention second), and that call gets the rolling cache's keys and values
  before the chunk's own (`core.causal.RollingKV`); any override already set (another node's attention choice)
  still computes the attention;
- RoPE time positions continue across chunks through `rope_options["shift_t"]`, ComfyUI's RoPE hook.
"""
import torch

from .backbone import direct_call_options, find_attachment
from .core.causal import INFVSR_TIMESTEP, TRAIN_TIMESTEPS

KEY = "litevsr_causal"  # transformer_options key of the call's RollingKV
OVERRIDE = "optimized_attention_override"


class CachedSelfAttention:
    """Attention override for one block call: the first call (self-attention) attends the cache and the chunk."""

    def __init__(self, cache, block, previous):
        self.cache, self.block, self.previous = cache, block, previous
        self.used = False

    def __call__(self, func, q, k, v, *args, **kwargs):
        if not self.used:
            self.used = True
            k, v = self.cache.attend_keys(self.block, k, v)
        if self.previous is not None:
            return self.previous(func, q, k, v, *args, **kwargs)
        return func(q, k, v, *args, **kwargs)


class CausalBlockPatch:
    def __init__(self, index):
        self.index = index

    def __deepcopy__(self, memo):
        return self  # stateless; 0.3.75's clone() deep-copies model_options

    def __call__(self, args, extra):
        options = args["transformer_options"]
        override = CachedSelfAttention(options[KEY], self.index, options.get(OVERRIDE))
        return extra["original_block"]({**args, "transformer_options": {**options, OVERRIDE: override}})


def causal_model(model):
    """A clone of `model` whose self-attention reads the rolling cache a call passes under `KEY`."""
    if find_attachment(model) is not None:
        raise ValueError("InfVSR runs without a LiteVSR adapter: connect 'Load InfVSR Model' straight to the "
                         "upscale node.")
    patched = model.clone()
    for index in range(len(patched.model.diffusion_model.blocks)):
        patched.set_model_patch_replace(CausalBlockPatch(index), "dit", "double_block", index)
    return patched


def causal_velocity(model, context, timestep=INFVSR_TIMESTEP):
    """velocity(x, cache) -> v for latents x [1, C, t, h, w] in the model's space: the DiT at `timestep` with
    `context` ([1, N, text_dim]) as cross-attention context, its self-attention extended by `cache` (a
    core.causal.RollingKV) and its RoPE time positions starting at `cache.position`. The caller advances the cache
    after the chunk."""
    patched = causal_model(model)
    options = direct_call_options(patched)
    device = patched.load_device
    patch_h, patch_w = patched.model.diffusion_model.patch_size[1:]
    sigma = timestep / TRAIN_TIMESTEPS  # ComfyUI's Wan takes timestep = sigma * 1000 (exactly 399.0 in float32)
    context = context.to(device)

    def velocity(x, cache):
        cache.begin_chunk((x.shape[-2] // patch_h) * (x.shape[-1] // patch_w))
        rope = dict(options.get("rope_options") or {})
        rope["shift_t"] = rope.get("shift_t", 0.0) + cache.position
        sigmas = torch.tensor([sigma], dtype=torch.float32, device=device)
        call_options = {**options, "rope_options": rope, KEY: cache, "sigmas": sigmas}
        x = x.to(device)
        x0 = patched.model.apply_model(x, sigmas, c_crossattn=context, transformer_options=call_options)
        return (x - x0.to(x.dtype)) / sigma  # ComfyUI returns x0 = x - sigma * v

    return velocity

