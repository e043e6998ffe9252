"""How this ComfyUI's Wan2.1 VAE (comfy/ldm/wan/vae.py) steps its causal cache, for a stream that keeps the cache.

WanVAE.encode/decode run the encoder/decoder over a clip in short time steps, each reading and updating a cache of
per-layer state (`feat_cache`: the last frames each causal conv saw), and drop the cache at the end. How they step
differs between ComfyUI versions, and a stream that keeps the cache between calls gives the whole clip's result only
when it steps as the installed version does. This is the one module that knows those internals:

- one latent a step (ComfyUI 0.3.x to 0.8: `count_conv3d`): the encoder takes frame 0 alone, then 4 frames a step;
  the decoder one latent a step. Every cache keeps 2 frames whatever the step's length, so any chunk on the
  4-frame grid continues the clip exactly.
- latent pairs (ComfyUI 0.33: `count_cache_layers`, `Decoder3d.run_up`, `final`): the encoder takes frame 0 alone,
  then 2 frames a step, and each temporal downsampling holds a lone output frame back (a deferred slot in the cache)
  until its pair arrives or the step is `final`; the decoder takes latent 0 alone, then 2 a step. A cache keeps only
  its step's own frames, so inside the clip a latent must pass the deep layers with its pair. A chunk that ends
  inside a pair gets that last latent from a look-ahead on a copy of the cache (the step the clip's end would take);
  the real cache takes the latent again with its pair on the next call, which drops the frames already returned.
"""
from inspect import signature

import comfy.ldm.wan.vae as wan_vae
import torch


def causal_steps(x, started, size):
    """`x [B, C, T, ...]` cut along time as WanVAE steps it: frame 0 alone when a stream starts, then `size` frames a
    step (the last may be shorter). Each step is a copy: the cache keeps views of a step, never of the whole chunk."""
    start = 0 if started else 1
    first = [] if started else [x[:, :, :1].clone()]
    return first + [x[:, :, i:i + size].clone() for i in range(start, x.shape[2], size)]


class OneLatentEncoder:
    """The encoder of ComfyUI 0.3.x-0.8: 4 frames a step after frame 0, one latent out of each."""

    def __init__(self, model):
        self.encoder = model.encoder
        self.cache = [None] * wan_vae.count_conv3d(model.encoder)
        self.started = False

    def __call__(self, pixels):
        steps = causal_steps(pixels, self.started, 4)
        self.started = True
        return torch.cat([self.encoder(step, feat_cache=self.cache, feat_idx=[0]) for step in steps], 2)


class OneLatentDecoder:
    """The decoder of ComfyUI 0.3.x-0.8: one latent a step."""

    def __init__(self, model):
        self.decoder = model.decoder
        self.cache = [None] * wan_vae.count_conv3d(model.decoder)

    def __call__(self, latent):
        steps = causal_steps(latent, True, 1)
        return torch.cat([self.decoder(step, feat_cache=self.cache, feat_idx=[0]) for step in steps], 2)


class PairedEncoder:
    """The encoder of ComfyUI 0.33: 2 frames a step after frame 0, latents leaving in pairs (see the module doc)."""

    def __init__(self, model):
        self.encoder = model.encoder
        self.cache = [None] * wan_vae.count_cache_layers(model.encoder)
        self.started = False
        self.given_ahead = 0  # latents the last call returned by look-ahead, still held back in the cache

    def __call__(self, pixels):
        steps = causal_steps(pixels, self.started, 2)
        self.started = True
        given_ahead, self.given_ahead = self.given_ahead, 0
        latents = [self.encoder(step, feat_cache=self.cache, feat_idx=[0]) for step in steps[:-1]]
        before_last = list(self.cache)
        latents.append(self.encoder(steps[-1], feat_cache=self.cache, feat_idx=[0]))
        if latents[-1] is None:  # the chunk ends inside a pair: its last latent waits in the cache for its partner;
            # the look-ahead redoes the last step (2 frames at full resolution) as the clip's last step would run it
            latents[-1] = self.encoder(steps[-1], feat_cache=before_last, feat_idx=[0], final=True)
            self.given_ahead = latents[-1].shape[2]
        return torch.cat([latent for latent in latents if latent is not None], 2)[:, :, given_ahead:]


class PairedDecoder:
    """The decoder of ComfyUI 0.33: latent 0 alone, then 2 latents a step (see the module doc)."""

    def __init__(self, model):
        self.decoder = model.decoder
        self.cache = [None] * wan_vae.count_cache_layers(model.decoder)
        self.started = False
        self.held = None  # the last chunk's lone last latent, decoded again with its partner
        self.given_ahead = 0  # frames of `held` already returned

    def step(self, cache, latent):
        return torch.cat(self.decoder(latent, feat_cache=cache, feat_idx=[0]), 2)

    def __call__(self, latent):
        if self.held is not None:
            latent = torch.cat([self.held, latent], 2)
        steps = causal_steps(latent, self.started, 2)
        stream_start_only = not self.started and len(steps) == 1  # latent 0, alone in any clip
        self.started = True
        given_ahead, self.given_ahead = self.given_ahead, 0
        self.held = steps[-1] if steps[-1].shape[2] == 1 and not stream_start_only else None
        frames = [self.step(self.cache, step) for step in (steps[:-1] if self.held is not None else steps)]
        if self.held is not None:  # decoded alone on a copy, as at the clip's end; the real cache waits for the pair
            frames.append(self.step(list(self.cache), self.held))
            self.given_ahead = frames[-1].shape[2]
        return torch.cat(frames, 2)[:, :, given_ahead:]


def causal_coders():
    """(encoder, decoder) stepper classes mirroring the installed WanVAE, or a one-line error for an unknown one."""
    paired = (hasattr(wan_vae, "count_cache_layers"), hasattr(wan_vae.Decoder3d, "run_up"),
              "final" in signature(wan_vae.Encoder3d.forward).parameters)
    if all(paired):
        return PairedEncoder, PairedDecoder
    if not any(paired) and hasattr(wan_vae, "count_conv3d"):
        return OneLatentEncoder, OneLatentDecoder
    raise RuntimeError("LiteVSR: this ComfyUI's Wan VAE (comfy/ldm/wan/vae.py) steps its causal cache in a way the "
                       "pack does not know (it knows ComfyUI 0.3.75-0.8's and 0.33's), so it cannot stream it chunk "
                       "by chunk.")
