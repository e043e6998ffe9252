"""InfVSR's causal streaming: chunk plan, one-step update, and the rolling KV cache on ComfyUI's real Wan DiT.

The equivalence: a stream of chunks through the cache computes what one pass over the whole clip computes with a
block-banded self-attention mask (each token sees its own chunk and the `cache_frames` latent frames before it)."""
import pytest
import torch

from comfyui_litevsr.nodes.causal_dit import OVERRIDE, causal_velocity
from comfyui_litevsr.nodes.causal_stream import CausalUpscale
from comfyui_litevsr.nodes.core.causal import (CausalPlan, RollingKV, causal_chunks, grid_sigma, one_step,
                                               padded_length)
from comfyui_litevsr.nodes.core.frames import crop_to, pad_for_encode, resize_frames
from comfyui_litevsr.nodes.infvsr import load_infvsr_dit
from comfyui_litevsr.nodes.reference import load_reference_encoder
from tools import tiny_models

TOKENS_HW = (4, 6)  # latent h, w: 2 x 3 tokens per frame


def context():
    return torch.randn(1, 20, 4096, generator=torch.Generator().manual_seed(3)) * 0.5


def latent(frames, seed=0):
    return torch.randn(1, 16, frames, *TOKENS_HW, generator=torch.Generator().manual_seed(seed))


def test_grid_sigma_is_the_shift5_grid_value_nearest_timestep_399():
    # hand computation: u = k/1000, sigma = 5u / (1 + 4u); u = 0.117 gives 398.50 (u = 0.118 gives 400.82)
    hand = 5 * 0.117 / (1 + 4 * 0.117)
    sigma = grid_sigma()
    print(f"InfVSR sigma at timestep 399: {sigma:.6f}")
    assert sigma == pytest.approx(hand, abs=1e-6)
    assert abs(sigma * 1000 - 399) < abs(5 * 0.118 / (1 + 4 * 0.118) * 1000 - 399)


def test_chunks_are_9_then_12_per_shot_without_overlap():
    chunks = causal_chunks(40, cuts=[25])
    spans = [(c.start, c.stop, c.new_shot) for c in chunks]
    assert spans == [(0, 9, True), (9, 21, False), (21, 25, False), (25, 34, True), (34, 40, False)]
    assert [f for c in chunks for f in c.frames] == list(range(40))
    assert [padded_length(len(c.frames), c.new_shot) for c in chunks] == [9, 12, 4, 9, 8]
    with pytest.raises(ValueError, match="4n\\+1"):
        CausalPlan(first_frames=8)


def banded_mask(chunk_frames, cache_frames, tokens_per_frame):
    """Additive mask of the one-pass reference: frame f's tokens see frames [chunk start - cache, chunk end)."""
    starts = torch.tensor([sum(chunk_frames[:i]) for i, n in enumerate(chunk_frames) for _ in range(n)])
    ends = torch.tensor([sum(chunk_frames[:i + 1]) for i, n in enumerate(chunk_frames) for _ in range(n)])
    frame = torch.arange(len(starts))
    allowed = (frame[None, :] >= starts[:, None] - cache_frames) & (frame[None, :] < ends[:, None])
    allowed = allowed.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))


def one_pass(model, x, chunk_frames, cache_frames, text=None):
    """The whole clip in one call, self-attention masked block-banded (the reference the stream must equal)."""
    import comfy.model_management

    text = context() if text is None else text
    tokens = x.shape[-2] // 2 * x.shape[-1] // 2
    mask = banded_mask(chunk_frames, cache_frames, tokens)

    def masked_self_attention(func, q, k, v, *args, **kwargs):
        if q.shape[1] == k.shape[1] == mask.shape[0] != text.shape[1]:  # self-attention, not the context's
            kwargs["mask"] = mask.to(q)
        return func(q, k, v, *args, **kwargs)

    options = model.model_options.setdefault("transformer_options", {})
    options[OVERRIDE] = masked_self_attention
    try:
        comfy.model_management.load_models_gpu([model])
        x0 = model.model.apply_model(x, torch.tensor([0.399]), c_crossattn=text, transformer_options=options)
        return (x - x0) / 0.399
    finally:
        del options[OVERRIDE]


def streamed(model, x, chunk_frames, cache_frames, shift_rope=True):
    velocity = causal_velocity(model, context())
    cache = RollingKV(cache_frames)
    out, start = [], 0
    for frames in chunk_frames:
        out.append(velocity(x[:, :, start:start + frames], cache))
        cache.advance(frames if shift_rope else 0)
        start += frames
    return torch.cat(out, dim=2)


@pytest.mark.parametrize("chunk_frames,cache_frames", [
    ((3, 3, 3), 3),  # InfVSR: 9 then 12 pixel frames, the previous chunk cached
    ((1, 1, 1, 1, 1), 1),
    ((2, 2, 2, 2, 1), 2),
    ((3, 3, 3), 6),  # a cache longer than a chunk
    ((4, 4, 1), 3),  # shorter than a chunk
    ((3, 3, 3), 0),  # no cache: chunks independent but for RoPE
])
def test_streaming_with_the_cache_equals_one_masked_pass(tiny_dit, chunk_frames, cache_frames):
    x = latent(sum(chunk_frames))
    reference = one_pass(tiny_dit, x, chunk_frames, cache_frames)
    result = streamed(tiny_dit, x, chunk_frames, cache_frames)
    assert result.shape == reference.shape
    torch.testing.assert_close(result, reference, rtol=1e-4, atol=1e-5)


def test_the_cache_and_the_rope_offset_both_matter(tiny_dit):
    """Guards the equivalence test: dropping the cache or the RoPE offset changes the result."""
    x = latent(9)
    reference = streamed(tiny_dit, x, (3, 3, 3), 3)
    later = slice(3, None)
    without_cache = streamed(tiny_dit, x, (3, 3, 3), 0)
    without_offset = streamed(tiny_dit, x, (3, 3, 3), 3, shift_rope=False)
    for other in (without_cache, without_offset):
        assert (other[:, :, later] - reference[:, :, later]).abs().max() > 1e-3
        torch.testing.assert_close(other[:, :, :3], reference[:, :, :3])  # the first chunk has nothing cached


def test_cache_is_bounded(tiny_dit):
    velocity = causal_velocity(tiny_dit, context())
    cache = RollingKV(3)
    sizes = []
    for index in range(8):
        velocity(latent(3, seed=index), cache)
        cache.advance(3)
        sizes.append(cache.nbytes())
    assert sizes[1] == sizes[-1] > 0  # two layers x (k, v) x 3 frames x 6 tokens x 256 channels x 4 bytes
    assert sizes[-1] == 2 * 2 * 3 * 6 * 256 * 4
    assert cache.position == 24


def test_one_step_equals_infvsr_formula_by_hand(tiny_dit):
    """restored = latent - sigma * v, with v the DiT's own output at timestep 399 (called directly here)."""
    x = latent(3)
    sigma = grid_sigma()
    restored = one_step(x, causal_velocity(tiny_dit, context())(x, RollingKV()), sigma)
    import comfy.model_management

    comfy.model_management.load_models_gpu([tiny_dit])
    dit = tiny_dit.model.diffusion_model
    v = dit(x, torch.tensor([399.0]), context())
    torch.testing.assert_close(restored, x - sigma * v, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def infvsr(tmp_path_factory):
    """The tiny InfVSR DiT and reference encoder, from files in InfVSR's released formats."""
    folder = tmp_path_factory.mktemp("infvsr")
    dit = load_infvsr_dit(str(tiny_models.save_tiny_infvsr(folder / "InfVSR.ckpt")), dtype=torch.float32)
    return dit, load_reference_encoder(*map(str, tiny_models.save_tiny_reference(folder)))


def test_causal_stream_equals_one_pass_over_the_whole_clip(infvsr, tiny_vae, sample_clip_frames):
    """The whole run, chunk by chunk (VAE caches, KV cache, RoPE position carried), against one pass: the whole
    clip encoded at once, one masked DiT call, decoded at once. 33 frames = chunks of 9, 12, 12 (3 latents each)."""
    model, reference = infvsr
    frames, scale = sample_clip_frames, 2
    run = CausalUpscale(model, tiny_vae, reference, scale, colour="none")
    chunks = causal_chunks(len(frames))
    streamed_frames = torch.cat([run.process(frames[c.start:c.stop], c) for c in chunks])

    height, width = scale * frames.shape[1], scale * frames.shape[2]
    base = model.model
    padded = pad_for_encode(resize_frames(frames, height, width), 16)
    lr = base.process_latent_in(tiny_vae.encode(padded).float())

    def one_pass_frames(cache_frames):
        v = one_pass(model, lr, (3, 3, 3), cache_frames, text=reference.encode(frames[0]))
        decoded = tiny_vae.decode(base.process_latent_out(one_step(lr, v, grid_sigma()))).float().cpu()
        return crop_to(decoded.reshape(padded.shape), len(frames), height, width)

    whole = one_pass_frames(3)
    assert streamed_frames.shape == whole.shape == (33, height, width, 3)
    torch.testing.assert_close(streamed_frames, whole, rtol=0, atol=2e-5)  # measured: 1.7e-6 at most
    # and the comparison can tell: without the cache, the later chunks' frames move far more than that
    assert (one_pass_frames(0)[9:] - whole[9:]).abs().max() > 1e-3
