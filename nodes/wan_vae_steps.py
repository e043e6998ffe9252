"""How this ComfyUI's Wan2.1 VAE (comfy/ldm/wan/vae.py) steps its causal cache, for a stream that keeps the cache.

WanVAE.encode/decode run the encoder/decoder over a clip in short time steps, each reading and updating a cache of
per-layer state (`feat_cache`: the last frames each causal conv saw), and drop the cache at the end. A stream that
keeps the cache between calls gives the whole clip's result only when it steps as the installed version does, and
that changed between versions (0.3.x-0.8: 4 frames / 1 latent a step; 0.33: 2 frames / 2 latents; others: 4 frames
with a `final` flag / 2 latents). So the stepping is not written down here: `read_stepping` runs ComfyUI's own
encode and decode loops once on a stand-in that records the steps they take (step sizes, cache length, whether a
`final` flag is passed), and the coders below take those steps with a cache that outlives the call.

Where latents pass the deep layers only in pairs (a step of 2 latents in the decoder; a temporal downsampling that
holds a lone latent back until its partner or the clip's `final` step in the encoder), a chunk that ends inside a
pair gets its last latent from a look-ahead on a copy of the cache (the step the clip's end would take); the real
cache takes that latent again with its partner on the next call, which drops the frames already returned.
"""
from dataclasses import dataclass
from types import SimpleNamespace

import torch


@dataclass(frozen=True)
class Stepping:
    encode_step: int  # pixel frames a step after frame 0
    decode_step: int  # latents a step after latent 0
    final_flag: bool  # the encoder takes `final` (a lone latent held back until then)
    encoder_cache: int  # length of the cache list the loops allocate
    decoder_cache: int


class StepRecorder(torch.nn.Module):
    """Stands in for the encoder or decoder in ComfyUI's loop: records each step and returns one 1x1 frame, as a
    tensor or (`as_list`: 0.33's decoder returns its pieces) a list, so the loop runs without computing anything."""

    def __init__(self, coder, steps, as_list=False):
        super().__init__()
        self.coder, self.steps, self.as_list = coder, steps, as_list  # the loops count `coder`'s cached layers

    def forward(self, x, feat_cache=None, feat_idx=None, **kwargs):
        self.steps.append((x.shape[2], None if feat_cache is None else len(feat_cache), "final" in kwargs))
        frame = torch.zeros(1, 2, 1, 1, 1)
        return [frame] if self.as_list else frame


def recorded_steps(model, loop, x, coder_name):
    """The steps `loop` (WanVAE.encode or decode) takes on `x`, its coder returning a tensor, else a list."""
    for as_list in (False, True):
        steps = []
        recorders = {name: StepRecorder(getattr(model, name), steps if name == coder_name else [], as_list)
                     for name in ("encoder", "decoder")}
        try:
            loop(SimpleNamespace(**recorders, conv1=lambda v: v, conv2=lambda v: v), x)
            return steps
        except (TypeError, RuntimeError):  # the loop wanted the other kind of result
            continue
    raise unknown_stepping(f"its {loop.__name__} loop runs on neither a tensor nor a list of pieces")


def read_stepping(model):
    """The steps this ComfyUI's WanVAE.encode / decode take, read by running them on a recorder (9 frames, 5
    latents); a one-line error where they do not have the shape this module streams."""
    encoder_steps = recorded_steps(model, type(model).encode, torch.zeros(1, 3, 9, 1, 1), "encoder")
    decoder_steps = recorded_steps(model, type(model).decode, torch.zeros(1, 2, 5, 1, 1), "decoder")
    encode_sizes, decode_sizes = [s[0] for s in encoder_steps], [s[0] for s in decoder_steps]
    caches = {s[1] for s in encoder_steps} | {s[1] for s in decoder_steps}
    if not (regular(encode_sizes, 9) and regular(decode_sizes, 5)) or None in caches:
        raise unknown_stepping(f"steps of {encode_sizes} frames and {decode_sizes} latents")
    return Stepping(encode_sizes[1], decode_sizes[1], any(s[2] for s in encoder_steps),
                    encoder_steps[0][1], decoder_steps[0][1])


def regular(sizes, total):
    """The first item alone, then steps of one size (the last may be shorter), covering `total`."""
    return len(sizes) > 1 and sizes[0] == 1 and sum(sizes) == total and all(s == sizes[1] for s in sizes[1:-1]) \
        and sizes[-1] <= sizes[1]


def unknown_stepping(what):
    return RuntimeError(f"LiteVSR: this ComfyUI's Wan VAE (comfy/ldm/wan/vae.py) steps its causal cache in a way the "
                        f"pack cannot stream chunk by chunk ({what}).")


def causal_steps(x, started, size):
    """`x [B, C, T, ...]` cut along time as WanVAE steps it: frame 0 alone when a stream starts, then `size` frames a
    step (the last may be shorter). Each step is a copy: the cache keeps views of a step, never of the whole chunk."""
    start = 0 if started else 1
    first = [] if started else [x[:, :, :1].clone()]
    return first + [x[:, :, i:i + size].clone() for i in range(start, x.shape[2], size)]


class CachedEncoder:
    """The encoder stepped as `stepping` says, its cache kept across calls (see the module doc)."""

    def __init__(self, model, stepping):
        self.encoder, self.stepping = model.encoder, stepping
        self.cache = [None] * stepping.encoder_cache
        self.started = False
        self.given_ahead = 0  # latents the last call returned by look-ahead, still held back in the cache

    def step(self, cache, pixels, final=False):
        flag = {"final": final} if self.stepping.final_flag else {}
        return self.encoder(pixels, feat_cache=cache, feat_idx=[0], **flag)

    def __call__(self, pixels):
        steps = causal_steps(pixels, self.started, self.stepping.encode_step)
        self.started = True
        given_ahead, self.given_ahead = self.given_ahead, 0
        latents = [self.step(self.cache, step) for step in steps[:-1]]
        before_last = list(self.cache)
        latents.append(self.step(self.cache, steps[-1]))
        if latents[-1] is None:  # the chunk ends inside a pair: its last latent waits in the cache for its partner;
            # the look-ahead redoes the last step as the clip's last step would run it
            latents[-1] = self.step(before_last, steps[-1], final=True)
            self.given_ahead = latents[-1].shape[2]
        return torch.cat([latent for latent in latents if latent is not None], 2)[:, :, given_ahead:]


class CachedDecoder:
    """The decoder stepped as `stepping` says, its cache kept across calls (see the module doc)."""

    def __init__(self, model, stepping):
        self.decoder, self.size = model.decoder, stepping.decode_step
        self.cache = [None] * stepping.decoder_cache
        self.started = False
        self.held = None  # the last chunk's lone last latent, decoded again with its partner
        self.given_ahead = 0  # frames of `held` already returned

    def step(self, cache, latent):
        frames = self.decoder(latent, feat_cache=cache, feat_idx=[0])
        return torch.cat(frames, 2) if isinstance(frames, list) else frames  # 0.33 returns a list of pieces

    def __call__(self, latent):
        if self.held is not None:
            latent = torch.cat([self.held, latent], 2)
        steps = causal_steps(latent, self.started, self.size)
        stream_start_only = not self.started and len(steps) == 1  # latent 0, alone in any clip
        self.started = True
        given_ahead, self.given_ahead = self.given_ahead, 0
        lone = steps[-1].shape[2] < self.size and not stream_start_only
        self.held = steps[-1] if lone else None
        frames = [self.step(self.cache, step) for step in (steps[:-1] if lone else steps)]
        if lone:  # decoded alone on a copy, as at the clip's end; the real cache waits for the pair
            frames.append(self.step(list(self.cache), self.held))
            self.given_ahead = frames[-1].shape[2]
        return torch.cat(frames, 2)[:, :, given_ahead:]
