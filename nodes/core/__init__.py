"""The torch core: adapter, sampling math, tiling, frames. Imports nothing of ComfyUI."""
