"""ComfyUI objects (MODEL with adapter, VAE) -> the core's callables: encode, tiled denoise, tiled decode.

The node graph (one node per stage) and the streaming node (all stages per chunk) build their steps here, so both
run the same code."""
import comfy.model_management

from .backbone import backbone_signature, find_attachment, make_denoiser
from .core.adapter import remember
from .core.backbones import family
from .core.dit_tiling import default_overlap, latent_tiling, patch_multiple, tiled_denoiser, training_tile
from .core.geometry import WAN_PATCH
from .decoders import decode_tiled


def check_interrupt(*_):
    comfy.model_management.throw_exception_if_processing_interrupted()


def grid_px(vae):
    """Pixel multiple the DiT needs, from the VAE plugged in: one token covers VAE stride x patch pixels."""
    return vae.spacial_compression_encode() * WAN_PATCH[1]


def check_vae(vae, model):
    """Refuses a VAE whose latents the DiT cannot take (a Wan2.1 VAE with Wan2.2 TI2V-5B, or the reverse)."""
    signature = backbone_signature(model)
    channels = getattr(vae, "latent_channels", signature.latent_channels)
    if channels != signature.latent_channels:
        raise ValueError(f"The VAE makes {channels}-channel latents but the {signature.family} DiT expects "
                         f"{signature.latent_channels}: load the VAE that matches the model (Wan2.1 VAE for Wan2.1, "
                         "Wan2.2 VAE for TI2V-5B).")


def lr_encoder(vae, model):
    """Padded pixel frames -> LR latent in the model's space (Wan latent normalisation applied)."""
    check_vae(vae, model)
    base = model.model
    return lambda pixels: base.process_latent_in(vae.encode(pixels).float())


def hr_decoder(vae, model, tile_px, overlap_px, on_tile=check_interrupt):
    """Clean latent in the model's space -> CPU float32 frames, decoded by `vae` (the Wan VAE or a tiny Wan
    decoder) in spatial tiles with one causal pass over time."""
    base = model.model
    return lambda latent: decode_tiled(vae, base.process_latent_out(latent.float().cpu()), tile_px, overlap_px,
                                       on_tile)


def dit_tiles(model, tile_px=0, overlap_px=0, latent_hw=None):
    """(tile, overlap) in latent units: given pixel sizes, or 0 for the backbone's training resolution."""
    signature = backbone_signature(model)
    if tile_px:
        return latent_tiling(signature, tile_px, overlap_px or None)
    tile = training_tile(signature, *(latent_hw or (None, None)))
    return tile, default_overlap(tile, patch_multiple(signature))


def dit_denoiser(model, tile, overlap, on_tile=check_interrupt):
    """The adapter-steered DiT as denoise(x, sigma, lr, estimate) -> x0, in spatial latent tiles where the
    latent is larger than `tile` (one call otherwise)."""
    multiple = patch_multiple(backbone_signature(model))
    return tiled_denoiser(make_denoiser(model), tile, overlap, multiple=multiple, on_tile=on_tile)


def context_sigma(model):
    """The noise level the DiT is shown a chunk's known frames at: its family's (core/backbones.py)."""
    return family(backbone_signature(model).family).context_sigma


def adapter_memory(model):
    """`remember(memory, clean_latents) -> memory` of the adapter attached to `model`, or None where it keeps no
    memory of earlier chunks (no adapter, or one without memory: every file made before the memory existed)."""
    attachment = find_attachment(model)
    adapter = None if attachment is None else attachment.adapter_patcher.model
    if adapter is None or not adapter.config.memory:
        return None
    return remember
