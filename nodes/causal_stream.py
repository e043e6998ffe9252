"""InfVSR's causal streaming run of one video, chunk after chunk (core/causal.py says why it is equivalent to
one pass): the Wan VAE's causal caches, the DiT's rolling KV cache and RoPE position, and the reference
context carry from chunk to chunk and restart at each new shot."""
from .causal_dit import causal_velocity
from .causal_vae import CausalVAEStream
from .core.causal import CausalPlan, RollingKV, grid_sigma, one_step, padded_length
from .core.colour import correct_colour
from .core.frames import crop_to, pad_for_encode, resize_frames
from .pipeline import grid_px


class CausalUpscale:
    """`process(frames, chunk)`: LR frames [N, h, w, 3] of the next chunk of `core.causal.causal_chunks` ->
    finished HR frames [N, s*h, s*w, 3]. `reference` turns a shot's first frame into the DiT's context."""

    def __init__(self, model, vae, reference, scale, colour="lab", plan=CausalPlan()):
        self.model, self.vae, self.reference = model, vae, reference
        self.scale, self.colour, self.plan = scale, colour, plan
        self.sigma = grid_sigma()
        self.grid_px = grid_px(vae)
        self.vae_stream = self.cache = self.velocity = None

    def start_shot(self, first_frame):
        self.vae_stream = CausalVAEStream(self.vae)
        self.cache = RollingKV(self.plan.cache_frames)
        self.velocity = causal_velocity(self.model, self.reference.encode(first_frame))

    def process(self, frames, chunk):
        if chunk.new_shot or self.vae_stream is None:
            self.start_shot(frames[0, ..., :3])
        count, height, width = frames.shape[:3]
        out_height, out_width = self.scale * height, self.scale * width
        upscaled = resize_frames(frames[..., :3], out_height, out_width)
        padded = pad_for_encode(upscaled, self.grid_px, padded_length(count, chunk.new_shot))
        base = self.model.model
        lr_latent = base.process_latent_in(self.vae_stream.encode(padded).float())
        restored = one_step(lr_latent, self.velocity(lr_latent, self.cache).to(lr_latent), self.sigma)
        self.cache.advance(lr_latent.shape[2])
        decoded = self.vae_stream.decode(base.process_latent_out(restored.float().cpu()))
        return correct_colour(crop_to(decoded, count, out_height, out_width), frames[..., :3], self.colour)
