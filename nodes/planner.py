"""The memory planner with ComfyUI's view of free memory, and ComfyUI's out-of-memory exception.

A plan here is core/memory_plan.py's: the chunk and tile sizes chosen for a run with their estimates."""
import comfy.model_management

from .core import memory_plan, oom
from .core.host_memory import host_available_bytes


def is_oom(exc):
    return isinstance(exc, comfy.model_management.OOM_EXCEPTION) or oom.default_is_oom(exc)


def plan_for_video(model, signature, num_frames, out_h, out_w, chunk_frames=0, dit_tile_px=0, decode_tile_px=0,
                   overlap_frames=0, processes_per_host=1):
    """A memory plan for streaming output against the compute device's free memory (after loading the models)
    and free host RAM, shared by `processes_per_host` processes on this machine; 0 means auto for each size."""
    comfy.model_management.load_models_gpu([model] + model.get_nested_additional_models())
    budget = comfy.model_management.get_free_memory(model.load_device)
    if model.load_device.type == "cpu":
        budget //= processes_per_host  # the processes share one RAM; GPUs are one per process
    stride = signature.vae_stride
    requested = {"chunk_frames": chunk_frames or "auto",
                 "dit_tile": (dit_tile_px // stride) if dit_tile_px else "auto",
                 "decode_tile": decode_tile_px or "auto"}
    dtype_bytes = comfy.model_management.dtype_size(model.model.get_dtype())
    options = memory_plan.PlanOptions(dtype_bytes=dtype_bytes, overlap_frames=overlap_frames, stream_output=True)
    return memory_plan.plan(signature, out_h, out_w, num_frames, budget,
                            host_available_bytes() // processes_per_host, requested, options)
