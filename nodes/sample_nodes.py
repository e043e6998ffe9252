"""LiteVSR Sampler: one or few flow-matching Euler steps with the adapter's clean-estimate feedback."""
import comfy.model_management
import comfy.utils
from comfy_api.latest import io

from .adapters import check_distilled_steps
from .backbone import backbone_signature
from .core.sampling import LR_LATENT_START_SIGMA, START_MODES, first_sigma, flow_sigmas, sample_vsr, video_noise
from .latents import vsr_info
from .pipeline import dit_denoiser, dit_tiles
from .progress import Eta, send_progress


def sampling_inputs():
    """The sampling settings, shared with the streaming node."""
    return [
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                     tooltip="Noise seed. The noise is drawn on the CPU and keyed by frame position, so a seed gives "
                             "the same result on any device and however the video is chunked."),
        io.Int.Input("steps", default=1, min=1, max=50,
                     tooltip="Euler steps. LiteVSR works down to one step; more steps refine the estimate. A "
                             "distilled adapter is made for 1 step (the run warns at any other count)."),
        io.Float.Input("shift", default=5.0, min=1.0, max=20.0, step=0.1,
                       tooltip="Flow time shift of the sigma schedule (Wan VSR models use about 5)."),
        io.Combo.Input("start", options=list(START_MODES), default="noise",
                       tooltip="noise: start from pure noise at sigma 1 (the paper). lr_latent: use the LR latent "
                               "itself as the state at 'start_sigma' (InfVSR/DOVE style)."),
        io.Float.Input("start_sigma", default=LR_LATENT_START_SIGMA, min=0.01, max=1.0, step=0.01,
                       tooltip="Only for start = lr_latent: the noise level the LR latent is treated as."),
    ]


class LiteVSRSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LiteVSRSampler",
            display_name="LiteVSR Sampler",
            category="LiteVSR",
            description="Upscales the encoded LR video: 1..N flow-matching Euler steps of the Wan DiT with its "
                        "State-Aware Adapter. After every step the adapter is shown the new clean estimate.",
            inputs=[
                io.Model.Input("model", tooltip="The Wan DiT with an adapter from 'Attach State-Aware Adapter'."),
                io.Latent.Input("latent", tooltip="The LR video from 'Encode LR Video (LiteVSR)'."),
                *sampling_inputs(),
                io.Int.Input("tile_size", default=0, min=0, max=8192, step=16, optional=True,
                             tooltip="DiT spatial tile in output pixels (a multiple of 16 for Wan2.1, 32 for "
                                     "Wan2.2). 0: the backbone's training resolution (832x480 for Wan2.1-1.3B, "
                                     "1280x720 for 14B, 1280x704 for Wan2.2-5B); larger videos are tiled with "
                                     "feathered overlaps and the same noise in every tile, for 2K/4K outputs."),
                io.Int.Input("tile_overlap", default=0, min=0, max=4096, step=16, optional=True,
                             tooltip="Overlap of neighbouring DiT tiles in output pixels; 0: 1/8 of the tile."),
            ],
            outputs=[io.Latent.Output(tooltip="The upscaled video latent, for 'Tiled Decode (LiteVSR)'.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, latent, seed, steps, shift, start, start_sigma, tile_size=0,
                tile_overlap=0) -> io.NodeOutput:
        vsr_info(latent)
        signature = backbone_signature(model)
        check_distilled_steps(model, steps)
        encoded = latent["samples"]
        if encoded.shape[1] != signature.latent_channels:
            raise ValueError(
                f"The LR latent has {encoded.shape[1]} channels but the {signature.family} DiT expects "
                f"{signature.latent_channels}: encode with the VAE that matches the model (Wan2.1 VAE for Wan2.1, "
                "Wan2.2 VAE for TI2V-5B).")
        base = model.model
        lr_latent = base.process_latent_in(encoded.float())
        sigmas = flow_sigmas(steps, shift, first_sigma(start, start_sigma))
        noise = video_noise(lr_latent.shape, seed)
        progress = comfy.utils.ProgressBar(steps)
        comfy.model_management.throw_exception_if_processing_interrupted()
        tile, overlap = dit_tiles(model, tile_size, tile_overlap, lr_latent.shape[-2:])
        denoise = dit_denoiser(model, tile, overlap)
        device = model.load_device
        node_id, eta = getattr(cls.hidden, "unique_id", None), Eta(0)
        settings = {"steps": steps, "start": start, "dit_tile": signature.width_height_px(tile),
                    "dit_overlap": signature.width_height_px(overlap),
                    "dit_tiled": tile[0] < lr_latent.shape[-2] or tile[1] < lr_latent.shape[-1]}

        def on_step(done, total):
            progress.update_absolute(done, total)
            send_progress(node_id, "sampling", done, total, eta(done, total), settings)
            comfy.model_management.throw_exception_if_processing_interrupted()

        clean = sample_vsr(denoise, lr_latent.to(device), noise.to(device), sigmas, start, on_step)
        return io.NodeOutput({**latent, "samples": base.process_latent_out(clean.float().cpu())})
