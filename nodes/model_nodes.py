"""Attach State-Aware Adapter: MODEL + adapter file (or a fresh zero-init adapter) -> MODEL."""
import folder_paths
from comfy_api.latest import io

from .adapters import NEW_ADAPTER, adapter_from_choice, with_adapter
from .backbone import backbone_signature
from .core.adapter import INJECTION_MODES
from .extension_paths import ADAPTER_FOLDER


def adapter_choice_inputs(adapter_tooltip):
    """The adapter file (or a new one) and the new adapter's shape: shared by Attach and Train."""
    return [
        io.Combo.Input("adapter", options=[NEW_ADAPTER] + folder_paths.get_filename_list(ADAPTER_FOLDER),
                       tooltip=adapter_tooltip),
        io.Combo.Input("injection", options=list(INJECTION_MODES), default="direct",
                       tooltip="For a new adapter only (a file records its own). direct (default): adapter features "
                               "are added after each block, about 1.03x the bare DiT's compute. shared_blocks: the "
                               "paper's mode, condition tokens pass the frozen blocks as a second batch, about 2x the "
                               "DiT's compute in every sampling and training step, for the same ~8% trainable "
                               "parameters (Wan2.1-1.3B) and no measured quality gain yet: README, 'Which injection "
                               "mode'."),
        io.Int.Input("rank", default=0, min=0, max=1024,
                     tooltip="For a new adapter only. 0: full-rank injection layers; r > 0: low-rank (LoRA-style) "
                             "injection with rank r, far fewer parameters."),
    ]


def context_inputs(overrides, stored=""):
    """The optional text-context inputs, last on Attach, Train and Distil (adapters.text_context picks among them):
    a CONDITIONING (`overrides`: what it takes precedence over) and Wan's text encoder; `stored` ends both
    tooltips (training: where the context goes)."""
    return [
        io.Conditioning.Input("conditioning", optional=True,
                              tooltip=f"Optional text conditioning (umt5), overriding {overrides}. Leave empty "
                                      f"for video super-resolution: no prompt is needed.{stored}"),
        io.Clip.Input("text_encoder", optional=True,
                      tooltip="Wan's umt5_xxl from 'Load CLIP' (type wan). Connected: the context is its "
                              "empty-prompt embedding, the umt5 input the frozen DiT knows for 'no prompt'. "
                              f"Unconnected: the context stored in the adapter file, else an all-zero context "
                              f"(only right for stand-in test models; a warning says so).{stored}"),
    ]


class LiteVSRAttachAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LiteVSRAttachAdapter",
            display_name="Attach State-Aware Adapter (LiteVSR)",
            category="LiteVSR",
            description="Attaches a LiteVSR State-Aware Adapter to a frozen Wan video DiT (Wan2.1 T2V 1.3B/14B or "
                        "Wan2.2 TI2V-5B from 'Load Diffusion Model'). The backbone stays untouched; the adapter "
                        "reads the LR video and the sampler's clean estimate and steers every block.",
            inputs=[
                io.Model.Input("model", tooltip="The Wan DiT from the stock 'Load Diffusion Model' node."),
                *adapter_choice_inputs("An adapter file from models/litevsr, or a fresh zero-initialised adapter "
                                       "(output then equals the bare backbone's; the starting point for training)."),
                *context_inputs("the text encoder and the context stored in the adapter file"),
            ],
            outputs=[io.Model.Output(tooltip="The backbone with the adapter attached, for 'LiteVSR Sampler'.")],
        )

    @classmethod
    def execute(cls, model, adapter, injection, rank, conditioning=None, text_encoder=None) -> io.NodeOutput:
        module, stored = adapter_from_choice(backbone_signature(model), adapter, injection, rank)
        return io.NodeOutput(with_adapter(model, module, stored, conditioning, text_encoder))
