"""Nodes that bring LR video frames into the LiteVSR latent space."""
from comfy_api.latest import io

from .core.frames import pad_for_encode, resize_frames
from .core.geometry import WAN_PATCH
from .latents import vsr_latent


class LiteVSREncodeVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LiteVSREncodeVideo",
            display_name="Encode LR Video (LiteVSR)",
            category="LiteVSR",
            description="Upscales the low-resolution frames by `scale` (bicubic), pads them to the Wan grid "
                        "(a multiple of 16 px for the Wan2.1 VAE, 32 px for Wan2.2; 4n+1 frames) and encodes "
                        "them with the VAE. The latent remembers the original frame count and size so "
                        "Tiled Decode (LiteVSR) can crop the result back exactly.",
            inputs=[
                io.Vae.Input("vae", tooltip="The Wan VAE that matches the diffusion model (Wan2.1 or Wan2.2)."),
                io.Image.Input("images", tooltip="The low-resolution frames to upscale, e.g. from Get Video "
                                                  "Components."),
                io.Int.Input("scale", default=4, min=1, max=8,
                             tooltip="Upscale factor: the output is scale x the input width and height."),
            ],
            outputs=[io.Latent.Output(tooltip="The encoded LR video plus its original size, for the VSR "
                                              "sampler and Tiled Decode (LiteVSR).")],
        )

    @classmethod
    def execute(cls, vae, images, scale) -> io.NodeOutput:
        if images.shape[0] == 0:
            raise ValueError("Encode LR Video (LiteVSR) got no frames: check the video loader upstream")
        count, height, width = images.shape[:3]
        out_height, out_width = scale * height, scale * width
        # One DiT token covers VAE stride x patch pixels, so the grid follows the VAE that is plugged in.
        grid_px = vae.spacial_compression_encode() * WAN_PATCH[1]
        padded = pad_for_encode(resize_frames(images[..., :3], out_height, out_width), grid_px)
        return io.NodeOutput(vsr_latent(vae.encode(padded), count, out_height, out_width))
