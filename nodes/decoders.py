"""The VAE that decodes: the full Wan VAE, or a tiny / light Wan decoder that ComfyUI's stock Load VAE gives.

Decoding may use another VAE than encoding: the LR latent must come from the full Wan VAE (the adapter was trained
on its encoder), but any decoder of the same latent space can turn the result into pixels. ComfyUI (since 0.3.5x)
loads the TAEHV-architecture tiny decoders (`taew2_1`, `lighttaew2_1`, `taew2_2`, `lighttaew2_2`;
comfy/taesd/taehv.py) and slimmer Wan VAEs (`lightvaew2_1`) through Load VAE; this module checks that such a VAE
decodes the latent in hand and calls it once per tile without ComfyUI's per-call decode wrapper.
"""
import logging

from .core.decode import decode_latent_tiling, tiled_decode
from .core.oom import halved_decode_tile, release_cached_memory
from .planner import is_oom
from .vae_calls import frames_out, load_for_decode, on_vae_device

log = logging.getLogger("LiteVSR")


def tiny_decoder_class():
    """ComfyUI's TAEHV class, or None on a ComfyUI too old to have it."""
    try:
        from comfy.taesd.taehv import TAEHV
    except ImportError:
        return None
    return TAEHV


def tiny_decoder_support():
    """None where this ComfyUI loads tiny Wan decoders, else the one line that says what to do."""
    if tiny_decoder_class() is None:
        return ("This ComfyUI cannot load tiny Wan decoders (taew2_1, lighttaew2_1, ...: it has no "
                "comfy/taesd/taehv.py): update ComfyUI, or decode with the Wan VAE.")
    return None


def is_tiny_decoder(vae):
    tiny = tiny_decoder_class()
    return tiny is not None and isinstance(vae.first_stage_model, tiny)


def describe(vae):
    """A short name for messages: which kind of decoder this VAE is."""
    kind = "tiny TAEHV decoder" if is_tiny_decoder(vae) else type(vae.first_stage_model).__name__
    return f"{kind} ({vae.latent_channels}-channel latents)"


def check_decoder(vae, latent_channels):
    """Refuses a VAE that cannot decode `latent_channels`-channel video latents, naming the fix."""
    if getattr(vae, "latent_dim", 3) != 3:
        raise ValueError(f"The decode VAE ({describe(vae)}) is an image VAE; plug in a Wan video VAE or a tiny Wan "
                         "decoder (taew2_1 / lighttaew2_1 for Wan2.1, taew2_2 / lighttaew2_2 for Wan2.2).")
    if vae.latent_channels != latent_channels:
        wanted = "taew2_1 / lighttaew2_1 / lightvaew2_1" if latent_channels == 16 else "taew2_2 / lighttaew2_2"
        raise ValueError(f"The decode VAE is a {describe(vae)} but the latent has {latent_channels} channels: "
                         f"use the Wan VAE that encoded it or a matching tiny decoder ({wanted}).")


def latent_scaling_fix(vae):
    """The inverse of a latent scaling ComfyUI's loader wrongly put in front of a Wan tiny decoder, or None.

    ComfyUI takes a 16-channel TAEHV file in fp16 for HunyuanVideo's `taehv` and scales its input by HunyuanVideo's
    factor (comfy/sd.py, the `decoder.22.bias` branch: only lighttaew2_1 is assumed to be in another dtype). Wan
    tiny decoders (taew2_1 ships in fp16) take the Wan latent unscaled, so that scaling is undone before the call:
    the pack only ever decodes Wan latents."""
    model = vae.first_stage_model
    latent_format = getattr(model, "latent_format", None) if is_tiny_decoder(vae) else None
    if latent_format is None or vae.latent_channels != 16:
        return None
    log.info("LiteVSR: the 16-channel tiny decoder was loaded as HunyuanVideo's taehv (an fp16 file); decoding "
             "Wan latents without HunyuanVideo's latent scaling")
    return latent_format().process_out


class TileDecoder:
    """Decodes latent tiles `[1, C, T', h, w]` (the Wan VAE's own latent space) to CPU float32 frames
    `[T, H, W, 3]`: the VAE is loaded once, with ComfyUI's memory estimate for the largest tile, then each tile
    goes straight to the decoder (ComfyUI's VAE.decode would redo the load, the estimate and its own OOM
    fallback, which tiles in time, for every tile)."""

    def __init__(self, vae, tile_latent_shape):
        self.vae = vae
        self.unscale = latent_scaling_fix(vae)
        load_for_decode(vae, tile_latent_shape)

    def __call__(self, latent):
        vae = self.vae
        if self.unscale is not None:
            latent = self.unscale(latent)
        with on_vae_device(vae):
            pixels = vae.first_stage_model.decode(latent.to(device=vae.device, dtype=vae.vae_dtype))
        return frames_out(vae, pixels)


def decode_tiled(vae, latent, tile_px, overlap_px, on_tile=None):
    """`latent [1, C, T', h, w]` in the Wan VAE's space -> CPU float32 frames `[T, h*s, w*s, 3]`, decoded by `vae`
    in spatial tiles of `tile_px` (core/decode.py), each over all frames in one causal pass."""
    check_decoder(vae, latent.shape[1])
    stride = vae.spacial_compression_decode()
    tile, _ = decode_latent_tiling(tile_px, overlap_px, stride)
    largest = (*latent.shape[:3], min(tile, latent.shape[3]), min(tile, latent.shape[4]))
    return tiled_decode(latent, TileDecoder(vae, largest), stride, tile_px, overlap_px, on_tile)


def decode_tiled_fitting(vae, latent, tile_px, overlap_px, on_tile=None):
    """`decode_tiled`, redone each time it runs out of memory with the tile halved as a streaming run halves it
    (oom.halved_decode_tile: the side actually decoded, so a tile larger than the image is not retried as is;
    overlap at most a quarter of the tile). For a decode that is a step of its own (the Tiled Decode node); a
    streaming run backs off per chunk instead (streaming.retrying)."""
    stride = vae.spacial_compression_decode()
    while True:
        try:
            return decode_tiled(vae, latent, tile_px, overlap_px, on_tile)
        except Exception as exc:  # an interrupt (BaseException) passes untouched
            smaller = halved_decode_tile(tile_px, max(latent.shape[-2:]) * stride, stride)
            if not is_oom(exc) or smaller is None:
                raise
        release_cached_memory()
        log.warning("LiteVSR: out of memory decoding %d px tiles, retrying with %d px", tile_px, smaller)
        tile_px, overlap_px = smaller, min(overlap_px, smaller // 4 // stride * stride)
