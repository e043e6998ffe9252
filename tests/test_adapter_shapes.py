"""Adapter configs derived from the real Wan geometries, built on the meta device (no weights allocated)."""
import pytest
import torch

from comfyui_litevsr.nodes.core.adapter import AdapterConfig, StateAwareAdapter, trainable_parameters
from comfyui_litevsr.nodes.core.backbones import WAN21_1_3B, WAN21_14B, WAN22_5B, release_of


def backbone_parameters(sig):
    """Parameter count of a published Wan T2V DiT (the registry's 1.3B / 14B / 5B releases)."""
    return release_of(sig).parameters


@pytest.mark.parametrize("name,sig,billions", [("Wan2.1-T2V-1.3B", WAN21_1_3B, 1.42), ("Wan2.1-T2V-14B", WAN21_14B, 14.3),
                                               ("Wan2.2-TI2V-5B", WAN22_5B, 5.0)])
@pytest.mark.parametrize("mode", ["direct", "shared_blocks"])
@pytest.mark.parametrize("rank", [0, 128])
def test_adapter_shapes_from_real_geometry(name, sig, billions, mode, rank):
    assert backbone_parameters(sig) / 1e9 == pytest.approx(billions, rel=0.03)
    with torch.device("meta"):
        adapter = StateAwareAdapter(AdapterConfig(sig, mode=mode, rank=rank))
    # Adapter tokens line up one to one with DiT tokens: same patch embedding geometry.
    assert adapter.structure_embed.weight.shape == (sig.dim, sig.latent_channels, *sig.patch_size)
    assert adapter.structure_embed.stride == sig.patch_size
    assert len(adapter.injections) == sig.num_layers
    for injection in adapter.injections:
        assert injection.up.out_features == sig.dim
        assert (injection.down is None) == (rank == 0)
        if rank:
            assert injection.down.out_features == rank
    if mode == "shared_blocks":
        assert adapter.condition_in.out_features == sig.dim
    n_injection = sum(p.numel() for p in adapter.injections.parameters())
    expected_injection = sig.num_layers * ((sig.dim * sig.dim + sig.dim) if rank == 0 else
                                           (2 * sig.dim * rank + sig.dim))
    assert n_injection == expected_injection
    trainable = trainable_parameters(adapter)
    share = trainable / (trainable + backbone_parameters(sig))
    print(f"\n{name:16s} {mode:13s} rank {rank:3d}: {trainable / 1e6:8.1f} M trainable "
          f"({n_injection / 1e6:.1f} M injection), {100 * share:.2f}% of backbone + adapter")
    assert share < 0.13  # LiteVSR's budget: at most ~12.7% trainable


def test_features_align_with_dit_tokens():
    """For any latent size (odd sizes included), one adapter token per DiT token, in the DiT's (t, h, w) order."""
    from comfyui_litevsr.nodes.core.geometry import BackboneSignature

    sig = BackboneSignature("wan2.1", dim=128, num_layers=2, num_heads=1, latent_channels=16, vae_stride=8)
    adapter = StateAwareAdapter(AdapterConfig(sig, window=(1, 4, 4)))
    for t, h, w in [(1, 2, 2), (3, 10, 14), (2, 7, 9)]:
        z = torch.randn(2, 16, t, h, w)
        tokens = adapter.features(z, z, torch.tensor([999.0, 10.0]))
        assert tokens.shape == (2, t * -(-h // 2) * -(-w // 2), 128)
        assert torch.isfinite(tokens).all()
    # Locality: a change in one corner of the latent leaves far-away windows' tokens untouched.
    z = torch.randn(1, 16, 1, 16, 16)
    z2 = z.clone()
    z2[..., :2, :2] += 1
    a, b = (adapter.features(v, v, torch.tensor([500.0])).reshape(8, 8, 128) for v in (z, z2))
    assert not torch.equal(a[:4, :4], b[:4, :4]) and torch.equal(a[4:, 4:], b[4:, 4:])
