"""The Wan2.1 VAE streamed chunk by chunk with its causal cache carried across calls (InfVSR's causal streaming).

ComfyUI's WanVAE.encode/decode start every call from an empty cache, so a clip coded in chunks differs from the clip
coded whole at every chunk start. `CausalVAEStream` keeps one encoder and one decoder cache across its calls and steps
the model as the installed ComfyUI does (nodes/wan_vae_steps.py), so chunk after chunk it returns what ComfyUI's
VAE.encode / VAE.decode return for the same frames within the whole clip. Its memory is the caches (every causal conv's
last frames at full resolution), the same after any number of chunks.
"""
import comfy.ldm.wan.vae as wan_vae
import torch

from .decoders import describe
from .vae_calls import frames_out, latent_out, load_for_decode, load_for_encode, on_vae_device, video_pixels_in
from .wan_vae_steps import CachedDecoder, CachedEncoder, read_stepping


class CausalVAEStream:
    """One video (or one shot of it) through ComfyUI's Wan2.1 `vae` in chunks; `reset()` at a scene cut.

    `encode(frames [T, H, W, 3])` -> the latent [1, 16, t, H/8, W/8] (un-normalised, as VAE.encode returns it);
    the first call takes T = 4k+1 frames (t = k+1), later calls T = 4k (t = k).
    `decode(latent [1, 16, t, h, w])` -> CPU float32 frames [T, 8h, 8w, 3] in 0..1; T = 4t-3 first, then 4t."""

    def __init__(self, vae):
        if not isinstance(vae.first_stage_model, wan_vae.WanVAE):
            raise ValueError(f"Causal streaming needs the Wan2.1 VAE; this VAE is a {describe(vae)}.")
        self.vae = vae
        self.stepping = read_stepping(vae.first_stage_model)
        self.reset()

    def reset(self):
        """Forgets both caches: the next chunk starts a new clip."""
        model = self.vae.first_stage_model
        self.encoder = CachedEncoder(model, self.stepping)
        self.decoder = CachedDecoder(model, self.stepping)

    @torch.no_grad()
    def encode(self, frames):
        stride = self.vae.temporal_compression_decode()  # 4 pixel frames a latent (the encoder's stride too)
        start = 0 if self.encoder.started else 1  # frame 0 of a clip is coded alone
        if frames.shape[0] < 1 or (frames.shape[0] - start) % stride:
            wanted = f"{stride}k+1" if start else f"{stride}k"
            raise ValueError(f"A {'first' if start else 'later'} chunk to encode has {wanted} frames, not "
                             f"{frames.shape[0]}.")
        pixels = video_pixels_in(self.vae, frames)
        load_for_encode(self.vae, pixels.shape)
        with on_vae_device(self.vae):
            features = self.encoder(pixels)
            mean = self.vae.first_stage_model.conv1(features).chunk(2, dim=1)[0]  # what WanVAE.encode returns
        return latent_out(self.vae, mean)

    @torch.no_grad()
    def decode(self, latent):
        load_for_decode(self.vae, latent.shape)
        with on_vae_device(self.vae):
            latent = latent.to(device=self.vae.device, dtype=self.vae.vae_dtype)
            pixels = self.decoder(self.vae.first_stage_model.conv2(latent))
        return frames_out(self.vae, pixels)

    def cache_bytes(self):
        """Bytes of the state carried to the next call (each tensor storage once: caches may hold views)."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for coder in (self.encoder, self.decoder) for t in carried_tensors(coder)}
        return sum(storages.values())


def carried_tensors(coder):
    """The tensors a stepper keeps between calls: in its cache list or held on their own."""
    for value in vars(coder).values():
        yield from (item for item in (value if isinstance(value, list) else [value]) if isinstance(item, torch.Tensor))
