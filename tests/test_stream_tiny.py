"""Chunked upscaling with the real (tiny) Wan DiT and VAE through ComfyUI: seamless chunk boundaries."""
import pytest
import torch

from comfyui_litevsr.nodes.adapters import NEW_ADAPTER
from comfyui_litevsr.nodes.backbone import find_attachment
from comfyui_litevsr.nodes.core.sampling import flow_sigmas
from comfyui_litevsr.nodes.core.stream import VSRPipeline, upscale_chunks
from comfyui_litevsr.nodes.core.temporal import split_chunks
from comfyui_litevsr.nodes.model_nodes import LiteVSRAttachAdapter
from comfyui_litevsr.nodes.pipeline import (adapter_memory, context_sigma, dit_denoiser, dit_tiles, grid_px, hr_decoder,
                                             lr_encoder)


def test_chunk_boundaries_are_closer_to_whole_clip_than_neighbouring_frames(tiny_dit, tiny_vae, sample_clip_frames):
    """Measure: mean absolute difference (0..1 scale) between chunked and whole-clip output on the frames around
    each chunk boundary (the cross-faded overlap and the first frames after it), against the mean absolute
    difference between consecutive frames of the whole-clip output inside chunks. A visible seam would make the
    boundary error at least as large as an ordinary frame-to-frame change."""
    clip = sample_clip_frames[:29]
    model = LiteVSRAttachAdapter.execute(tiny_dit, NEW_ADAPTER, "direct", 0, None).result[0]
    tile, overlap = dit_tiles(model)
    pipe = VSRPipeline(lr_encoder(tiny_vae, model), dit_denoiser(model, tile, overlap),
                       hr_decoder(tiny_vae, model, 512, 64), grid_px(tiny_vae), scale=2,
                       sigmas=flow_sigmas(1, 5.0), seed=0, colour="none")
    with torch.no_grad():
        whole, _ = pipe.process(clip)
        chunks = split_chunks(len(clip), 17, 8)
        written = []
        upscale_chunks(chunks, (clip[c.start:c.stop] for c in chunks), pipe.process, written.append)
    chunked = torch.cat(written)
    assert chunked.shape == whole.shape == (29, 2 * clip.shape[1], 2 * clip.shape[2], 3)

    boundary = sorted({t for c in chunks[1:] for t in range(c.start, min(c.start + 12, len(clip)))})
    boundary_error = (chunked[boundary] - whole[boundary]).abs().mean().item()
    interior = [t for t in range(1, len(clip)) if t not in boundary and t - 1 not in boundary]
    neighbour_change = torch.stack([(whole[t] - whole[t - 1]).abs().mean() for t in interior]).mean().item()
    print(f"\nboundary |chunked - whole| {boundary_error:.4f} vs interior |frame - previous| {neighbour_change:.4f}")
    assert boundary_error < neighbour_change


@pytest.mark.slow  # three chunked runs of the real tiny DiT and VAE
def test_an_untrained_memory_leaves_chunked_output_exact_and_a_trained_one_reaches_the_dit(tiny_dit, tiny_vae,
                                                                                             sample_clip_frames):
    """A new adapter keeps a memory of earlier chunks (zero-initialised): with its injections trained (off zero), the
    chunked output with the memory carried equals the output without it bit for bit; once the memory's projections
    move off zero the later chunks change and the first (which has no memory yet) does not."""
    clip = sample_clip_frames[:29]
    model = LiteVSRAttachAdapter.execute(tiny_dit, NEW_ADAPTER, "direct", 0, None).result[0]
    adapter = find_attachment(model).adapter_patcher.model
    assert adapter.config.memory and adapter_memory(model) is not None
    tile, overlap = dit_tiles(model)
    pipe = VSRPipeline(lr_encoder(tiny_vae, model), dit_denoiser(model, tile, overlap),
                       hr_decoder(tiny_vae, model, 512, 64), grid_px(tiny_vae), scale=2,
                       sigmas=flow_sigmas(1, 5.0), seed=0, colour="none", context_sigma=context_sigma(model))
    chunks = split_chunks(len(clip), 17, 8)

    def chunked(remember):
        written = []
        with torch.no_grad():
            upscale_chunks(chunks, (clip[c.start:c.stop] for c in chunks), pipe.process, written.append,
                           remember=remember)
        return torch.cat(written)

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # injections off zero, so the adapter's features reach the output
        for injection in adapter.injections:
            injection.up.weight.normal_(std=0.05, generator=generator)
    without = chunked(None)
    assert torch.equal(chunked(adapter_memory(model)), without)
    with torch.no_grad():
        for out in adapter.memory.out:
            out.weight.normal_(std=0.05, generator=generator)
    trained = chunked(adapter_memory(model))
    first_only = chunks[1].start  # frames before the second chunk's are the first chunk's alone (no memory yet)
    assert torch.equal(trained[:first_only], without[:first_only])
    assert (trained[first_only:] - without[first_only:]).abs().max() > 1e-4
