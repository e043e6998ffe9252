"""ComfyUI-LiteVSR: video super-resolution with a State-Aware Adapter on a frozen Wan video DiT.

ComfyUI loads this folder as a package. Node classes are imported only when ComfyUI asks for them, so the torch
core in `nodes/core` can be imported (and tested) without a running ComfyUI.
"""

WEB_DIRECTORY = "./js"


async def comfy_entrypoint():
    from .nodes.extension import LiteVSRExtension

    return LiteVSRExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
