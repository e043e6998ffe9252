"""Attach State-Aware Adapter: MODEL + adapter file (or a fresh zero-init adapter) -> MODEL."""
import torch

import folder_paths
from comfy_api.latest import io

from .backbone import attach_adapter, backbone_signature
from .core.adapter import INJECTION_MODES, AdapterConfig, StateAwareAdapter
from .core.adapter_file import load_adapter
from .core.geometry import TEXT_TOKENS
from .extension_paths import ADAPTER_FOLDER

NEW_ADAPTER = "new (zero-init)"


def new_adapter(signature, mode, rank, seed=0):
    """A fresh adapter; seeded so a fresh start (and training from it) is reproducible."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return StateAwareAdapter(AdapterConfig(signature, mode=mode, rank=rank))


def adapter_choice_inputs(adapter_tooltip):
    """The adapter file (or a new one) and the new adapter's shape: shared by Attach and Train."""
    return [
        io.Combo.Input("adapter", options=[NEW_ADAPTER] + folder_paths.get_filename_list(ADAPTER_FOLDER),
                       tooltip=adapter_tooltip),
        io.Combo.Input("injection", options=list(INJECTION_MODES), default="direct",
                       tooltip="For a new adapter only (a file records its own). direct: adapter features are added "
                               "after each block (fast). shared_blocks: the paper's mode, condition tokens pass the "
                               "frozen blocks as a second batch (about 2x DiT cost)."),
        io.Int.Input("rank", default=0, min=0, max=1024,
                     tooltip="For a new adapter only. 0: full-rank injection layers; r > 0: low-rank (LoRA-style) "
                             "injection with rank r, far fewer parameters."),
    ]


def adapter_from_choice(signature, adapter, injection, rank, seed=0):
    """(module, stored text context or None) for a combo choice of `adapter_choice_inputs`."""
    if adapter == NEW_ADAPTER:
        return new_adapter(signature, injection, rank, seed), None
    return load_adapter(folder_paths.get_full_path_or_raise(ADAPTER_FOLDER, adapter), signature)


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
                io.Conditioning.Input("conditioning", optional=True,
                                      tooltip="Optional text conditioning (umt5) overriding the context stored in "
                                              "the adapter file. Leave empty: no text encoder is needed."),
            ],
            outputs=[io.Model.Output(tooltip="The backbone with the adapter attached, for 'LiteVSR Sampler'.")],
        )

    @classmethod
    def execute(cls, model, adapter, injection, rank, conditioning=None) -> io.NodeOutput:
        signature = backbone_signature(model)
        module, context = adapter_from_choice(signature, adapter, injection, rank)
        if conditioning is not None:
            context = conditioning[0][0]
        if context is None:
            context = torch.zeros(1, TEXT_TOKENS, signature.text_dim)
        return io.NodeOutput(attach_adapter(model, module, context))
