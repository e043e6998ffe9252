"""Nodes that turn the upscaled latent back into frames: tiled decode and colour correction."""
import comfy.model_management
import comfy.utils
from comfy_api.latest import io

from .core.colour import METHODS, correct_colour
from .core.decode import tile_count
from .core.frames import crop_to
from .decoders import decode_tiled_fitting
from .latents import vsr_info
from .progress import Eta, send_progress


class LiteVSRTiledDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LiteVSRTiledDecode",
            display_name="Tiled Decode (LiteVSR)",
            category="LiteVSR",
            description="Decodes the upscaled latent in spatial tiles, each over all frames in one pass, so the "
                        "video VAE's temporal cache is never restarted (no temporal seams, unlike VAE Decode "
                        "(Tiled) on long clips). Tiles are feathered together and the result is cropped to "
                        "exactly the frame count and size recorded by Encode LR Video (LiteVSR).",
            inputs=[
                io.Vae.Input("vae", tooltip="The VAE that decodes: the Wan VAE used by Encode LR Video (LiteVSR), or "
                                            "a faster decoder of the same latents from Load VAE: taew2_1 / "
                                            "lighttaew2_1 / lightvaew2_1 for Wan2.1, taew2_2 / lighttaew2_2 for "
                                            "Wan2.2 (README: which decoder to pick)."),
                io.Latent.Input("latent", tooltip="The upscaled latent from the VSR sampler; it must come from "
                                                  "Encode LR Video (LiteVSR)."),
                io.Int.Input("tile_size", default=512, min=64, max=4096, step=16,
                             tooltip="Tile width and height in output pixels. Smaller tiles use less memory; "
                                     "a clip that fits in one tile is decoded in one call. On running out of "
                                     "memory the tile is halved and the decode redone."),
                io.Int.Input("overlap", default=64, min=0, max=2048, step=16,
                             tooltip="Pixels shared by neighbouring tiles, blended with a cosine ramp. More "
                                     "overlap hides seams better at the cost of extra decoding."),
            ],
            outputs=[io.Image.Output(tooltip="The decoded frames at the exact upscaled size.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, vae, latent, tile_size, overlap) -> io.NodeOutput:
        metadata = vsr_info(latent)
        samples = latent["samples"]
        stride = vae.spacial_compression_decode()
        progress = comfy.utils.ProgressBar(tile_count(*samples.shape[-2:], stride, tile_size, overlap))
        node_id, eta = getattr(cls.hidden, "unique_id", None), Eta(0)
        settings = {"decode_tile": tile_size, "decode_overlap": overlap}

        def on_tile(done, total):
            progress.update_absolute(done, total)
            send_progress(node_id, "decode", done, total, eta(done, total), settings)
            comfy.model_management.throw_exception_if_processing_interrupted()

        frames = decode_tiled_fitting(vae, samples, tile_size, overlap, on_tile)
        return io.NodeOutput(crop_to(frames, metadata["frames"], metadata["height"], metadata["width"]))


class LiteVSRColorCorrect(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LiteVSRColorCorrect",
            display_name="Colour Correction (LiteVSR)",
            category="LiteVSR",
            description="Pulls the colours of the upscaled frames back to those of the low-resolution input. "
                        "Statistics are taken over the whole clip, so the correction does not flicker.",
            inputs=[
                io.Image.Input("images", tooltip="The upscaled frames to correct."),
                io.Image.Input("reference", tooltip="The low-resolution frames the upscale was made from "
                                                     "(same frame count)."),
                io.Combo.Input("method", options=list(METHODS), default="lab",
                               tooltip="lab: match brightness and colour statistics in CIELAB (recommended). "
                                       "wavelet: keep the upscale's fine detail on the reference's colours and "
                                       "shading. adain: match RGB channel statistics. none: pass through."),
            ],
            outputs=[io.Image.Output(tooltip="The colour-corrected frames.")],
        )

    @classmethod
    def execute(cls, images, reference, method) -> io.NodeOutput:
        return io.NodeOutput(correct_colour(images[..., :3], reference[..., :3], method))
