"""Compare Before/After (LiteVSR): one frame of the LR input (bicubic to the output size) next to the upscale,
saved as two PNGs in ComfyUI's temp folder and shown by the pack's front end as a split view."""
import os
import uuid

import torch
from PIL import Image

import folder_paths
from comfy_api.latest import io

from .core.frames import resize_frames

UI_KEY = "litevsr_compare"  # the execution message key js/litevsr.js looks for


def frame_index(frame, before_count, after_count):
    """The frame to show: `frame`, or the middle one for -1; refused with both counts when out of range."""
    count = min(before_count, after_count)
    if count < 1:
        raise ValueError(f"Compare Before/After (LiteVSR) got no frames (before: {before_count}, after: "
                         f"{after_count})")
    if frame == -1:
        return count // 2
    if not 0 <= frame < count:
        detail = f"{count} frames" if before_count == after_count else \
            f"{before_count} frames before and {after_count} after"
        raise ValueError(f"Compare Before/After (LiteVSR): frame {frame} does not exist ({detail}); use 0.."
                         f"{count - 1}, or -1 for the middle frame")
    return frame


def _save_png(image, folder, name):
    array = (image.detach().to("cpu").float().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(array).save(os.path.join(folder, name), compress_level=1)


def save_compare(before_frame, after_frame, index):
    """Saves one LR frame resized (bicubic) to the upscaled frame's size, and the upscaled frame, as PNGs in the
    temp folder; returns the `litevsr_compare` ui entry: {"before", "after": {filename, subfolder, type}, "frame",
    "size": [w, h]}. Frames are [H, W, C] in 0..1 (C >= 3)."""
    height, width = after_frame.shape[:2]
    before = resize_frames(before_frame[None, ..., :3].float().cpu(), height, width)[0]
    folder = folder_paths.get_temp_directory()
    os.makedirs(folder, exist_ok=True)
    stem = f"litevsr_compare_{uuid.uuid4().hex[:16]}"
    entry = {"frame": int(index), "size": [int(width), int(height)]}
    for key, image in (("before", before), ("after", after_frame[..., :3])):
        name = f"{stem}_{key}.png"
        _save_png(image, folder, name)
        entry[key] = {"filename": name, "subfolder": "", "type": "temp"}
    return entry


class LiteVSRCompare(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LiteVSRCompare",
            display_name="Compare Before/After (LiteVSR)",
            category="LiteVSR",
            description="Shows one frame of the low-resolution input, resized to the output size with bicubic "
                        "interpolation, against the same frame of the upscale, in a split view with a slider "
                        "on the node. Nothing is saved to the output folder (the two PNGs go to ComfyUI's "
                        "temp folder).",
            inputs=[
                io.Image.Input("before", tooltip="The low-resolution frames the upscale was made from (e.g. Get "
                                                  "Video Components' images); shown bicubic-resized."),
                io.Image.Input("after", tooltip="The upscaled frames (e.g. from Colour Correction (LiteVSR)); "
                                                 "their size is the size of the comparison."),
                io.Int.Input("frame", default=-1, min=-1, max=1_000_000,
                             tooltip="Which frame to compare, counted from 0; -1: the middle frame."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, before, after, frame) -> io.NodeOutput:
        index = frame_index(frame, before.shape[0], after.shape[0])
        return io.NodeOutput(ui={UI_KEY: [save_compare(before[index], after[index], index)]})
