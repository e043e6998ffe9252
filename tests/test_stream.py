"""Long videos in chunks: exact for a model without temporal reach, and carried state at the boundaries."""
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from comfyui_litevsr.nodes.core.sampling import flow_sigmas
from comfyui_litevsr.nodes.core.stream import VSRPipeline, carried_frames, upscale_chunks
from comfyui_litevsr.nodes.core.temporal import split_chunks

STRIDE = 8


def group_encode(frames):
    """A causal 'VAE' whose latent k sees only its own frame group (frame 0 alone, then 4 frames each)."""
    pixels = rearrange(frames, "t h w c -> t c h w")
    pooled = F.avg_pool2d(pixels, STRIDE)
    groups = [pooled[:1]] + [pooled[i:i + 4].mean(0, keepdim=True) for i in range(1, len(pooled), 4)]
    return rearrange(torch.cat(groups), "t c h w -> 1 c t h w")


def group_decode(latent):
    frames = []
    for k, group in enumerate(rearrange(latent[0], "c t h w -> t c h w")):
        up = F.interpolate(group[None], scale_factor=STRIDE, mode="nearest")
        frames += [up] if k == 0 else [up * (1 + 0.05 * i) for i in range(4)]
    return rearrange(torch.cat(frames), "t c h w -> t h w c")


def per_frame_denoise(x, sigma, lr_latent, estimate, carried=None):
    return 0.5 * lr_latent + 0.25 * torch.tanh(x) * (1 - sigma) + 0.2 * estimate


def pipeline(steps, start="noise"):
    sigmas = flow_sigmas(steps, 5.0, 1.0 if start == "noise" else 0.4)
    return VSRPipeline(group_encode, per_frame_denoise, group_decode, grid_px=16, scale=2, sigmas=sigmas,
                       start=start, seed=11, colour="none")


def run_chunked(pipe, clip, chunk_frames, overlap):
    chunks = split_chunks(len(clip), chunk_frames, overlap)
    written = []
    upscale_chunks(chunks, (clip[c.start:c.stop] for c in chunks), pipe.process, written.append)
    return torch.cat(written), chunks


@pytest.mark.parametrize("frames", [1, 2, 7, 33, 61])
@pytest.mark.parametrize("chunk_frames,overlap", [(9, 0), (9, 4), (13, 4), (17, 8), (21, 12)])
@pytest.mark.parametrize("steps,start", [(1, "noise"), (3, "noise"), (2, "lr_latent")])
def test_chunked_equals_whole_clip_for_a_model_without_temporal_reach(frames, chunk_frames, overlap, steps, start):
    clip = torch.rand(frames, 24, 40, 3, generator=torch.Generator().manual_seed(frames))
    pipe = pipeline(steps, start)
    whole, _ = pipe.process(clip)
    chunked, chunks = run_chunked(pipe, clip, chunk_frames, overlap)
    assert chunked.shape == whole.shape == (frames, 48, 80, 3)
    assert torch.equal(chunked, whole)


def test_carried_frames_map_to_the_previous_chunks_latents():
    chunks = split_chunks(40, 17, 8)
    first, second = chunks[0], chunks[1]
    latents = torch.arange(5.0).view(1, 1, 5, 1, 1)  # chunk latent k holds k
    known = carried_frames(first, latents, second)
    # second starts at pixel 8 (= first's latent 2); its latents 1 and 2 are first's latents 3 and 4
    assert second.start == 8 and known.frames == (1, 2)
    assert known.values.flatten().tolist() == [3.0, 4.0]


def test_carried_state_reaches_the_next_chunk():
    """A model with temporal reach (mixes neighbouring latent frames) sees the previous chunk's result."""
    seen = []

    def temporal_denoise(x, sigma, lr_latent, estimate, carried=None):
        seen.append(estimate.clone())
        return 0.5 * lr_latent + 0.5 * estimate.mean(dim=2, keepdim=True)

    pipe = VSRPipeline(group_encode, temporal_denoise, group_decode, grid_px=16, scale=2, sigmas=flow_sigmas(1, 5.0),
                       seed=1, colour="none")
    clip = torch.rand(25, 16, 16, 3, generator=torch.Generator().manual_seed(0))
    chunks = split_chunks(25, 17, 8)
    latents = []

    def process(frames, first_frame, known, memory):
        hr, clean = pipe.process(frames, first_frame, known, memory)
        latents.append(clean)
        return hr, clean

    upscale_chunks(chunks, (clip[c.start:c.stop] for c in chunks), process, lambda frames: None)
    # The second chunk's refinement stream started from the first chunk's finished latents 3 and 4.
    assert torch.equal(seen[1][:, :, 1:3], latents[0][:, :, 3:5])
    assert torch.equal(latents[1][:, :, 1:3], latents[0][:, :, 3:5])


def test_memory_runs_through_the_chunks_and_resets_with_the_known_frames():
    """Each chunk gets remember(...) of the chunks before it in its shot and segment, and known frames exactly where
    it gets a memory; remember=None carries known frames only."""
    chunks = split_chunks(45, 9, 4, cuts=[17])  # a cut at frame 17: chunks 0-2, then 3-8
    seen = []

    def process(frames, first_frame, known, memory):
        seen.append((known is not None, memory))
        return frames, torch.full((1, 1, 3, 1, 1), float(len(seen) - 1))  # chunk i's latents hold i

    def remember(memory, clean):
        return (memory or ()) + (int(clean[0, 0, 0, 0, 0]),)

    def walk(segment_chunks, remember):
        seen.clear()
        upscale_chunks(chunks, (torch.zeros(c.stop - c.start, 1, 1, 3) for c in chunks), process, lambda f: None,
                       segment_chunks=segment_chunks, remember=remember)
        return list(seen)

    assert [c.new_shot for c in chunks] == [True, False, False, True] + [False] * 5
    expected = [(False, None), (True, (0,)), (True, (0, 1)), (False, None), (True, (3,)), (True, (3, 4)),
                (True, (3, 4, 5)), (True, (3, 4, 5, 6)), (True, (3, 4, 5, 6, 7))]
    assert walk(0, remember) == expected
    segmented = walk(4, remember)  # segments restart at chunks 4 and 8
    assert segmented[:4] == expected[:4] and segmented[4:6] == [(False, None), (True, (4,))]
    assert segmented[8] == (False, None)
    assert walk(0, None) == [(known, None) for known, _ in expected]


def test_the_pipeline_shows_known_frames_at_its_context_level():
    recorded = []

    def denoise(x, sigma, lr_latent, estimate, carried=None):
        recorded.append(carried)
        return per_frame_denoise(x, sigma, lr_latent, estimate)

    pipe = VSRPipeline(group_encode, denoise, group_decode, grid_px=16, scale=2, sigmas=flow_sigmas(1, 5.0), seed=1,
                       colour="none", context_sigma=0.125)
    clip = torch.rand(25, 16, 16, 3, generator=torch.Generator().manual_seed(0))
    memory = torch.zeros(1, 3, 2, 2, 2)
    upscale_chunks(split_chunks(25, 17, 8), (clip[:17], clip[8:]), pipe.process, lambda f: None,
                   remember=lambda previous, clean: memory)
    assert recorded[0] is None  # nothing carried into the first chunk: the denoiser gets four arguments
    assert recorded[1].frame_sigmas.tolist() == [1.0, 0.125, 0.125, 1.0, 1.0] and recorded[1].memory is memory


@pytest.mark.parametrize("num_chunks,segment,world", [(7, 2, 2), (8, 3, 3), (3, 1, 4), (5, 5, 2)])
def test_rank_ranges_are_contiguous_on_segment_boundaries(num_chunks, segment, world):
    from comfyui_litevsr.nodes.core.distributed import rank_ranges

    ranges = rank_ranges(num_chunks, segment, world)
    assert ranges[0][0] == 0 and ranges[-1][1] == num_chunks
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(start % segment == 0 or start == stop for start, stop in ranges)


def test_shared_upscale_equals_one_process(tmp_path):
    """Ranks run in turn here (the torchrun test runs them as real processes): same frames as one process with
    the same segment length, and carried state really restarts at segment boundaries."""
    from comfyui_litevsr.nodes.core.distributed import upscale_shared

    def temporal_denoise(x, sigma, lr_latent, estimate, carried=None):
        return 0.5 * lr_latent + 0.5 * estimate.mean(dim=2, keepdim=True)

    pipe = VSRPipeline(group_encode, temporal_denoise, group_decode, grid_px=16, scale=2, sigmas=flow_sigmas(2, 5.0),
                       seed=4, colour="none")
    clip = torch.rand(45, 16, 16, 3, generator=torch.Generator().manual_seed(2))
    chunks = split_chunks(45, 9, 4)
    read = lambda indices: (clip[chunks[i].start:chunks[i].stop] for i in indices)  # noqa: E731
    single = []
    upscale_chunks(chunks, read(range(len(chunks))), pipe.process, single.append, segment_chunks=3)
    no_segments = []
    upscale_chunks(chunks, read(range(len(chunks))), pipe.process, no_segments.append)
    assert not torch.equal(torch.cat(single), torch.cat(no_segments))  # segments do restart the carried state

    shared = []
    for rank in reversed(range(3)):  # later ranks first: rank 0 then finds their chunks waiting
        upscale_shared(chunks, rank, 3, 3, read, pipe.process, shared.append, str(tmp_path))
    assert torch.equal(torch.cat(shared), torch.cat(single))
    assert not list(tmp_path.iterdir())  # every handed-over chunk was taken and removed
