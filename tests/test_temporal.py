"""Chunk plans on the causal 4n+1 grid, exact overlap stitching, streaming stitcher, scene cuts on real footage."""
from tools import demo
import pytest
import torch

from comfyui_litevsr.nodes.core.frames import resize_frames
from comfyui_litevsr.nodes.core.temporal import (DEFAULT_CUT_THRESHOLD, SceneCutDetector, Stitcher, blend_weights,
                                                 split_chunks)
from helpers import stitch
from comfyui_litevsr.nodes.core.video_io import VideoReader

COMBOS = [(frames, chunk, overlap) for frames in (1, 2, 7, 33, 34, 150)
          for chunk, overlap in ((5, 0), (9, 4), (33, 8), (33, 0), (17, 12))]
CUT_COMBOS = [(150, 33, 8, (40, 41, 100)), (150, 17, 4, (1, 149)), (34, 9, 4, (9,))]


def shot_starts(chunks):
    return [chunk.start for chunk in chunks if chunk.new_shot]


def latent_groups(chunk):
    """Causal VAE grouping of a chunk encoded on its own: latent 0 <- its first frame, latent k <- frames 4k-3..4k."""
    groups = [(chunk.start,)]
    for first in range(chunk.start + 1, chunk.start + chunk.padded_frames, 4):
        groups.append(tuple(range(first, first + 4)))
    return groups


def pad_to_grid(frames, count):
    """What the caller does to a short last chunk: replicate its last frame."""
    return torch.cat([frames, frames[-1:].expand(count - len(frames), *frames.shape[1:])])


def per_frame(frames):
    """A nonlinear per-frame 'model' that also upscales 2x: each output frame depends only on its input frame."""
    peak = frames.amax(dim=(1, 2, 3), keepdim=True)
    out = torch.sin(3 * frames) * peak + frames.square()
    return out.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)


def run_chunks(clip, chunks, model):
    for chunk in chunks:
        yield model(pad_to_grid(clip[chunk.start:chunk.stop], chunk.padded_frames))


@pytest.mark.parametrize("frames, chunk_frames, overlap", COMBOS)
def test_every_frame_is_owned_once_and_chunks_are_4n_plus_1(frames, chunk_frames, overlap):
    chunks = split_chunks(frames, chunk_frames, overlap)
    owned = [frame for chunk in chunks for frame in chunk.owned]
    assert owned == list(range(frames))
    assert chunks[0].new_shot and not any(chunk.new_shot for chunk in chunks[1:])
    assert all(len(chunk.frames) == chunk_frames for chunk in chunks[:-1])
    assert all(chunk.start % 4 == 0 for chunk in chunks)
    assert all(chunk.padded_frames % 4 == 1 and chunk.padded_frames >= len(chunk.frames) for chunk in chunks)
    assert chunks[-1].stop == frames


@pytest.mark.parametrize("frames, chunk_frames, overlap", COMBOS)
def test_overlaps_are_whole_latent_frames_in_both_chunks(frames, chunk_frames, overlap):
    chunks = split_chunks(frames, chunk_frames, overlap)
    for earlier, later in zip(chunks, chunks[1:]):
        assert earlier.stop - later.start == overlap + 1  # the later chunk's anchor, then the cross-fade
        assert len(later.fade_in) == overlap == earlier.stop - earlier.owned_stop
        blended = set(range(later.out_start, earlier.stop))
        for chunk in (earlier, later):
            groups_touched = [set(group) for group in latent_groups(chunk) if blended & set(group)]
            assert set().union(*groups_touched) == blended  # each touched latent lies wholly inside the blend
        anchor_group = [group for group in latent_groups(earlier) if later.start in group][0]
        assert anchor_group[-1] == later.start  # the anchor closes a latent group of the earlier chunk


@pytest.mark.parametrize("frames, chunk_frames, overlap, cuts", CUT_COMBOS)
def test_chunks_restart_at_scene_cuts(frames, chunk_frames, overlap, cuts):
    chunks = split_chunks(frames, chunk_frames, overlap, cuts)
    assert shot_starts(chunks) == [0, *cuts]
    assert [frame for chunk in chunks for frame in chunk.owned] == list(range(frames))
    for chunk in chunks:
        assert not any(chunk.start < cut < chunk.stop for cut in cuts)  # nothing reads across a cut
        shot = max(start for start in shot_starts(chunks) if start <= chunk.start)
        assert (chunk.start - shot) % 4 == 0
        assert chunk.new_shot == (chunk.start == shot) and (chunk.fade_in == ()) == (chunk.new_shot or overlap == 0)


@pytest.mark.parametrize("chunk_frames, overlap", [(32, 0), (33, 3), (33, 30), (5, 4), (0, 0)])
def test_off_grid_sizes_are_refused(chunk_frames, overlap):
    with pytest.raises(ValueError, match="chunk_frames|overlap_frames"):
        split_chunks(100, chunk_frames, overlap)


@pytest.mark.parametrize("overlap", [1, 4, 8, 12, 20])
def test_blend_weights_are_a_symmetric_partition_of_unity(overlap):
    weights = torch.tensor(blend_weights(overlap), dtype=torch.float64)
    assert len(weights) == overlap
    assert torch.all((weights > 0) & (weights < 1))
    assert torch.all(weights[1:] > weights[:-1])
    torch.testing.assert_close(weights + weights.flip(0), torch.ones(overlap, dtype=torch.float64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("frames, chunk_frames, overlap, cuts",
                         [(*combo, ()) for combo in COMBOS] + CUT_COMBOS)
def test_stitched_per_frame_model_equals_the_whole_clip_bit_for_bit(frames, chunk_frames, overlap, cuts):
    clip = torch.rand(frames, 3, 5, 3, generator=torch.Generator().manual_seed(frames))
    chunks = split_chunks(frames, chunk_frames, overlap, cuts)
    stitched = stitch(run_chunks(clip, chunks, per_frame), chunks)
    assert torch.equal(stitched, per_frame(clip))


def test_overlap_is_cross_faded_between_chunks():
    chunks = split_chunks(60, 33, 8)
    outputs = [torch.full((chunk.padded_frames, 1, 1, 3), float(index)) for index, chunk in enumerate(chunks)]
    stitched = stitch(outputs, chunks)[:, 0, 0, 0]
    for index, chunk in enumerate(chunks[1:], start=1):
        fade = stitched[chunk.out_start:chunk.out_start + 8]
        expected = (index - 1) + torch.tensor(blend_weights(8), dtype=torch.float32)
        torch.testing.assert_close(fade, expected)  # previous value + w * (step of 1)
        assert stitched[chunk.out_start + 8] == index  # after the fade: this chunk alone
    assert stitched[chunks[1].out_start - 1] == 0  # before the fade: the first chunk alone


def test_streaming_stitcher_emits_frames_in_order_and_holds_only_the_overlap():
    frames, chunk_frames, overlap = 150, 33, 8
    clip = torch.arange(frames, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 2, 2, 3)
    chunks = split_chunks(frames, chunk_frames, overlap)
    stitcher = Stitcher(chunks)
    emitted = []
    for chunk, output in zip(chunks, run_chunks(clip, chunks, lambda x: x.clone())):
        finished = stitcher.push(output)
        assert len(finished) == len(chunk.owned)  # released as soon as no later chunk can change them
        assert len(finished) + stitcher.held_frames <= chunk_frames + overlap
        assert stitcher.held_frames == (overlap if chunk is not chunks[-1] else 0)
        emitted.extend(finished[:, 0, 0, 0].tolist())
    assert stitcher.done
    assert emitted == list(range(frames))
    with pytest.raises(ValueError, match="already stitched"):
        stitcher.push(output)


def test_stitcher_refuses_a_truncated_chunk():
    chunks = split_chunks(40, 17, 4)
    with pytest.raises(ValueError, match="needs 17 frames"):
        Stitcher(chunks).push(torch.zeros(16, 1, 1, 3))


# --- scene cuts on real footage -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bunny():
    """All 132 frames of bigbuckbunny at 320x180, decoded in chunks (never all at 1280x720)."""
    reader = VideoReader(demo.bigbuckbunny())
    return torch.cat([resize_frames(chunk, 180, 320) for chunk in reader.chunks(12)])


def test_no_cut_in_bigbuckbunnys_own_motion(bunny):
    assert SceneCutDetector().cut_points(bunny) == []
    assert SceneCutDetector().scores(bunny).max() < DEFAULT_CUT_THRESHOLD / 3  # not a near miss either


@pytest.mark.parametrize("other", ["later shot", "colour shifted", "mirrored"])
def test_hard_cut_to_different_footage_fires_once(bunny, other):
    second = {"later shot": bunny[100:], "colour shifted": bunny[60:, :, :, [2, 0, 1]],
              "mirrored": bunny[60:].flip(2)}[other]
    clip = torch.cat([bunny[:40], second])
    assert SceneCutDetector().cut_points(clip) == [40]
    assert SceneCutDetector(enabled=False).cut_points(clip) == []


def test_detector_streams_across_chunks_with_global_indices(bunny):
    clip = torch.cat([bunny[:40], bunny[100:]])
    detector = SceneCutDetector()
    found = [cut for start in range(0, len(clip), 16) for cut in detector.cut_points(clip[start:start + 16])]
    assert found == [40] and detector.frames_seen == len(clip)
    detector.reset()
    assert [detector.is_cut(frame) for frame in clip[38:42]] == [False, False, True, False]
