"""Load InfVSR Model and Load InfVSR Reference Encoder: InfVSR's released weights as ComfyUI sockets."""
import folder_paths
from comfy_api.latest import io

from .extension_paths import INFVSR_FOLDER
from .infvsr import WEIGHT_DTYPES, load_infvsr_dit
from .reference import SOCKET_TYPE, load_reference_encoder

REFERENCE = io.Custom(SOCKET_TYPE)
PICKLE_NOTE = (".ckpt/.pth files are read weights-only (a file holding anything but tensors is refused); convert "
               "them once to .safetensors with `python -m tools.infvsr convert IN OUT`.")


class LiteVSRLoadInfVSR(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LiteVSRLoadInfVSR",
            display_name="Load InfVSR Model (LiteVSR)",
            category="LiteVSR",
            description="Loads InfVSR's DiT (InfVSR.ckpt, or its safetensors conversion) as a ComfyUI MODEL. It is a "
                        "Wan2.1 T2V 1.3B that reads 512-wide visual tokens from the reference encoder instead of "
                        "umt5 text, which the stock 'Load Diffusion Model' cannot build.",
            inputs=[
                io.Combo.Input("dit_name", options=folder_paths.get_filename_list("diffusion_models"),
                               tooltip="InfVSR's DiT from models/diffusion_models: InfVSR.ckpt as released, or the "
                                       "safetensors made from it. " + PICKLE_NOTE),
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="default",
                               tooltip="The weights' dtype in memory. default: ComfyUI's choice for this device "
                                       "(as 'Load Diffusion Model'); fp8 halves the memory at some quality cost."),
            ],
            outputs=[io.Model.Output(tooltip="InfVSR's DiT: a Wan2.1 MODEL, which LiteVSR tells from a stock Wan by "
                                             "its 512-wide context.")],
        )

    @classmethod
    def execute(cls, dit_name, weight_dtype) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("diffusion_models", dit_name)
        return io.NodeOutput(load_infvsr_dit(path, WEIGHT_DTYPES[weight_dtype]))


class LiteVSRLoadInfVSRReference(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        files = folder_paths.get_filename_list(INFVSR_FOLDER)
        return io.Schema(
            node_id="LiteVSRLoadInfVSRReference",
            display_name="Load InfVSR Reference Encoder (LiteVSR)",
            category="LiteVSR",
            description="Loads the reference encoder InfVSR conditions its DiT with: RAM's Swin-L image encoder with "
                        "DAPE's LoRA merged in. It turns a reference frame into the 512-wide visual tokens that "
                        "InfVSR's DiT reads in place of text.",
            inputs=[
                io.Combo.Input("ram_name", options=files,
                               tooltip="RAM's ram_swin_large_14m.pth (or its safetensors conversion, which keeps "
                                       "only the image encoder) from models/infvsr. " + PICKLE_NOTE),
                io.Combo.Input("dape_name", options=files,
                               tooltip="InfVSR's DAPE.pth (or its safetensors conversion) from models/infvsr: the "
                                       "LoRA merged into RAM's encoder. " + PICKLE_NOTE),
            ],
            outputs=[REFERENCE.Output(display_name="reference",
                                      tooltip="The reference encoder, for LiteVSR's InfVSR runs.")],
        )

    @classmethod
    def execute(cls, ram_name, dape_name) -> io.NodeOutput:
        return io.NodeOutput(load_reference_encoder(folder_paths.get_full_path_or_raise(INFVSR_FOLDER, ram_name),
                                                    folder_paths.get_full_path_or_raise(INFVSR_FOLDER, dape_name)))
