"""The adapter's bounded memory of earlier chunks: exact identity while untrained, a fixed size whatever the video's
length, the stated aggregation rule, and a path that learns."""
import pytest
import torch

from comfyui_litevsr.nodes.core.adapter import (MEMORY_HALF_LIVES, MEMORY_SLOTS, AdapterConfig, StateAwareAdapter,
                                                remember, trainable_parameters)
from comfyui_litevsr.nodes.core.backbones import WAN21_1_3B
from comfyui_litevsr.nodes.core.geometry import TEMPORAL_STRIDE, BackboneSignature, frames_on_grid

SIG = BackboneSignature("wan2.1", dim=128, num_layers=3, num_heads=1, latent_channels=16, vae_stride=8)
TIMESTEP = torch.tensor([900.0, 30.0])


def latents(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def seeded_adapter(seed=0, **config):
    torch.manual_seed(seed)
    return StateAwareAdapter(AdapterConfig(SIG, window=(1, 4, 4), **config))


def injected(adapter, features, dit_tokens):
    """What each block would add to the DiT's residual stream, in either injection mode."""
    source = features if adapter.config.mode == "direct" else adapter.condition_tokens(dit_tokens, features)
    return [adapter.inject(i, source) for i in range(SIG.num_layers)]


@pytest.mark.parametrize("mode,rank", [("direct", 0), ("direct", 8), ("shared_blocks", 0), ("shared_blocks", 8)])
def test_zero_initialised_memory_is_exact_identity(mode, rank):
    adapter = seeded_adapter(mode=mode, rank=rank)
    with torch.no_grad():
        for injection in adapter.injections:  # a trained adapter's injections: the injected tokens are not zeros
            injection.up.weight.normal_(std=0.02)
    lr, estimate = latents(2, 16, 3, 7, 9, seed=1), latents(2, 16, 3, 7, 9, seed=2)
    memory = remember(None, latents(2, 16, 5, 7, 9, seed=3))  # odd h, w: padded windows are masked alike
    dit_tokens = latents(2, 3 * 4 * 5, SIG.dim, seed=4)
    with torch.no_grad():
        without = adapter.features(lr, estimate, TIMESTEP)
        with_memory = adapter.features(lr, estimate, TIMESTEP, memory)
        assert torch.equal(with_memory, without)
        for a, b in zip(injected(adapter, with_memory, dit_tokens), injected(adapter, without, dit_tokens)):
            assert b.abs().max() > 0 and torch.equal(a, b)
        # The memory path is wired in: once its projections move, the features move.
        for out in adapter.memory.out:
            out.weight.normal_(std=0.02)
        assert (adapter.features(lr, estimate, TIMESTEP, memory) - without).abs().max() > 1e-3


def test_memory_none_is_todays_computation():
    """Without a memory, an adapter with one computes exactly what an adapter without one does (same seed: the
    memory's weights are built last, so all others are equal)."""
    with_path, without_path = seeded_adapter(memory=True), seeded_adapter(memory=False)
    assert without_path.memory is None
    assert set(with_path.state_dict()) - set(without_path.state_dict()) == {
        name for name in with_path.state_dict() if name.startswith("memory.")}
    z = latents(2, 16, 2, 8, 8, seed=5)
    with torch.no_grad():
        assert torch.equal(with_path.features(z, z, TIMESTEP), without_path.features(z, z, TIMESTEP))


def test_memory_refused_where_it_does_not_fit():
    z = latents(2, 16, 2, 8, 8, seed=6)
    memory = remember(None, z)
    with pytest.raises(ValueError, match="no memory of earlier chunks"):
        seeded_adapter(memory=False).features(z, z, TIMESTEP, memory)
    with pytest.raises(ValueError, match="does not fit"):  # a memory of another tile
        seeded_adapter().features(z[..., :6], z[..., :6], TIMESTEP, memory)
    with pytest.raises(ValueError, match="does not fit"):
        remember(memory, z[:1])


def chunked_memory(video_frames, chunk=21, h=6, w=10):
    """The memory after remembering a video of `video_frames` frames chunk by chunk (21 latent frames = 81 video
    frames, the default chunk)."""
    total = (frames_on_grid(video_frames) - 1) // TEMPORAL_STRIDE + 1
    memory = None
    for start in range(0, total, chunk):
        memory = remember(memory, latents(1, 16, min(chunk, total - start), h, w, seed=start))
    return memory


def test_memory_size_is_constant_in_video_length():
    short, long = chunked_memory(150), chunked_memory(600)
    assert short.shape == long.shape == (1, 16, MEMORY_SLOTS, 6, 10)
    assert short.nbytes == long.nbytes == 16 * MEMORY_SLOTS * 6 * 10 * 4
    assert torch.isfinite(long).all()


def test_aggregation_rule():
    """Slot k is a per-latent-frame moving average with half-life MEMORY_HALF_LIVES[k], whatever the chunking."""
    video = latents(1, 16, 30, 4, 6, seed=7)
    whole = remember(None, video)
    chunked = remember(remember(remember(None, video[:, :, :4]), video[:, :, 4:21]), video[:, :, 21:])
    assert torch.allclose(chunked, whole, atol=1e-5)
    # A shot of constant content c is remembered as c (None starts every slot at the first frame).
    assert torch.allclose(remember(None, torch.full((1, 16, 9, 4, 6), 0.7)), torch.full((1, 16, 3, 4, 6), 0.7))
    # A cut from 0 to 1 eight latent frames ago: each slot has moved 1 - 2^(-8 / half-life) of the way.
    memory = remember(remember(None, torch.zeros(1, 16, 40, 4, 6)), torch.ones(1, 16, 8, 4, 6))
    expected = torch.tensor([1 - 0.5 ** (8 / half_life) for half_life in MEMORY_HALF_LIVES])
    assert torch.allclose(memory[0, 0, :, 0, 0], expected, atol=1e-6)
    assert expected[0] > 0.99 and expected[-1] < 0.1  # short and long history


def test_memory_path_learns():
    adapter = seeded_adapter()
    z = latents(2, 16, 2, 8, 8, seed=8)
    memory = remember(None, latents(2, 16, 6, 8, 8, seed=9))
    target = latents(2, 2 * 4 * 4, SIG.dim, seed=10)  # one token per 1x2x2 patch
    optimizer = torch.optim.Adam(adapter.parameters(), lr=1e-3)

    def step():
        optimizer.zero_grad()
        (adapter.features(z, z, TIMESTEP, memory) - target).square().mean().backward()
        grad = adapter.memory.embed.weight.grad.abs().max()
        optimizer.step()
        return grad

    assert step() == 0  # behind the zero projection nothing reaches the memory's embedding yet...
    assert all(out.weight.abs().max() > 0 for out in adapter.memory.out)  # ...but the projections moved
    assert step() > 0  # and now it does
    with torch.no_grad():
        assert (adapter.features(z, z, TIMESTEP, memory) - adapter.features(z, z, TIMESTEP)).abs().max() > 1e-4


def test_memory_parameters_at_wan21_1_3b():
    with torch.device("meta"):
        with_memory = StateAwareAdapter(AdapterConfig(WAN21_1_3B))
        without = StateAwareAdapter(AdapterConfig(WAN21_1_3B, memory=False))
    dim, window = WAN21_1_3B.dim, with_memory.config.window
    patch = WAN21_1_3B.latent_channels * 4  # Wan's 1x2x2 patch
    expected = ((patch * dim + dim) + MEMORY_SLOTS * window[1] * window[2] * dim
                + with_memory.config.depth * (dim * dim + dim))
    added = trainable_parameters(with_memory) - trainable_parameters(without)
    assert added == trainable_parameters(with_memory.memory) == expected
    print(f"\nWan2.1-1.3B adapter: {trainable_parameters(without) / 1e6:.2f} M without memory, "
          f"+{added / 1e6:.2f} M memory ({100 * added / trainable_parameters(without):.1f} %)")
    assert added < 0.05 * trainable_parameters(without)
