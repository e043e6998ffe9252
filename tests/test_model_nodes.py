"""The attach and sampler nodes on real ComfyUI-loaded models: good paths, and bad input refused by name."""
import pytest
import torch

from tools import tiny_models
from comfyui_litevsr.nodes.adapters import NEW_ADAPTER, new_adapter
from comfyui_litevsr.nodes.backbone import UnsupportedBackbone, backbone_signature
from comfyui_litevsr.nodes.core.adapter_file import AdapterFileError, save_adapter
from comfyui_litevsr.nodes.core.geometry import BackboneSignature
from comfyui_litevsr.nodes.latents import vsr_latent
from comfyui_litevsr.nodes.model_nodes import LiteVSRAttachAdapter
from comfyui_litevsr.nodes.sample_nodes import LiteVSRSampler


def load(path):
    import comfy.sd

    return comfy.sd.load_diffusion_model(str(path))


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    import folder_paths

    folder = tmp_path_factory.mktemp("litevsr_models")
    folder_paths.add_model_folder_path("litevsr", str(folder))
    return folder


def attach(model, adapter=NEW_ADAPTER, injection="direct", rank=0, conditioning=None):
    return LiteVSRAttachAdapter.execute(model, adapter, injection, rank, conditioning).result[0]


def sample(model, latent, steps=1, start="noise"):
    return LiteVSRSampler.execute(model, latent, 0, steps, 5.0, start, 0.4).result[0]


def test_signature_of_the_tiny_wan(tiny_dit):
    assert backbone_signature(tiny_dit) == BackboneSignature("wan2.1", dim=256, num_layers=2, num_heads=2,
                                                             latent_channels=16, vae_stride=8)


@pytest.mark.matrix("Models", "non-Wan MODEL")
def test_non_wan_model_is_refused_by_name(tmp_path):
    ltxv = load(tiny_models.save_tiny_ltxv(tmp_path / "ltxv.safetensors"))
    with pytest.raises(UnsupportedBackbone, match=r"got LTXV \(LTXVModel\)"):
        attach(ltxv)


def test_wan_i2v_is_refused_by_name(tmp_path):
    i2v = load(tiny_models.save_tiny_wan_i2v(tmp_path / "i2v.safetensors"))
    with pytest.raises(UnsupportedBackbone, match="model_type i2v, in_dim 36"):
        attach(i2v)


def test_adapter_file_round_trip_through_the_node(tiny_dit, adapter_dir):
    adapter = new_adapter(backbone_signature(tiny_dit), "shared_blocks", 4, seed=3)
    with torch.no_grad():
        for injection in adapter.injections:
            injection.up.weight.normal_(std=0.05)
    context = torch.zeros(1, 512, 4096)
    save_adapter(adapter_dir / "trained.safetensors", adapter, context)
    patched = attach(tiny_dit, "trained.safetensors")
    attached = patched.additional_models["litevsr"][0].model
    assert attached.config == adapter.config
    assert all(torch.equal(a, b) for a, b in zip(attached.state_dict().values(), adapter.state_dict().values()))


@pytest.mark.matrix("Models", "adapter from another backbone")
def test_mismatched_adapter_is_refused_with_both_signatures(tiny_dit, adapter_dir):
    other = BackboneSignature("wan2.1", dim=128, num_layers=2, num_heads=1, latent_channels=16, vae_stride=8)
    save_adapter(adapter_dir / "other.safetensors", new_adapter(other, "direct", 0), None)
    with pytest.raises(AdapterFileError) as err:
        attach(tiny_dit, "other.safetensors")
    assert other.describe() in str(err.value) and backbone_signature(tiny_dit).describe() in str(err.value)


@pytest.mark.matrix("Models", "adapter file that is a pickle renamed to .safetensors")
def test_pickle_adapter_is_refused(tiny_dit, adapter_dir):
    import pickle

    (adapter_dir / "pickled.safetensors").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(AdapterFileError, match="only loads safetensors"):
        attach(tiny_dit, "pickled.safetensors")


def test_attaching_twice_is_refused(tiny_dit):
    with pytest.raises(ValueError, match="already has a LiteVSR adapter"):
        attach(attach(tiny_dit))


@pytest.mark.matrix("Models", "Wan2.1 DiT with a Wan2.2 VAE")
def test_sampler_contract_and_errors(tiny_dit):
    patched = attach(tiny_dit)
    latent = vsr_latent(torch.randn(1, 16, 2, 4, 6), frames=5, height=64, width=96)
    for start in ("noise", "lr_latent"):
        out = sample(patched, latent, steps=2, start=start)
        assert out["samples"].shape == latent["samples"].shape and out["litevsr"] == latent["litevsr"]
        assert torch.isfinite(out["samples"]).all()
    # Deterministic by seed.
    assert torch.equal(sample(patched, latent)["samples"], sample(patched, latent)["samples"])
    with pytest.raises(ValueError, match="Encode LR Video"):
        sample(patched, {"samples": latent["samples"]})
    with pytest.raises(ValueError, match="48 channels but the wan2.1 DiT expects 16"):
        sample(patched, vsr_latent(torch.randn(1, 48, 2, 4, 6), 5, 64, 96))
    with pytest.raises(ValueError, match="no LiteVSR adapter"):
        sample(tiny_dit, latent)


def test_wan22_ti2v_geometry_is_supported(tmp_path):
    """A Wan2.2 TI2V-5B-shaped DiT (48 latent channels) loads through ComfyUI's detection as WAN22 and takes an
    adapter whose shapes follow it; a fresh adapter is the identity there too."""
    import comfy.model_management

    wan22 = load(tiny_models.save_tiny_wan_dit(tmp_path / "wan22.safetensors", dim=128, num_layers=2,
                                               family="wan2.2"))
    assert type(wan22.model).__name__ == "WAN22"
    signature = backbone_signature(wan22)
    assert (signature.family, signature.latent_channels, signature.vae_stride, signature.grid_px) == \
        ("wan2.2", 48, 16, 32)
    patched = attach(wan22, injection="shared_blocks", rank=8)
    adapter = patched.additional_models["litevsr"][0].model
    assert adapter.structure_embed.in_channels == 48 and len(adapter.injections) == 2
    latent = vsr_latent(torch.randn(1, 48, 2, 4, 6), frames=5, height=128, width=192)
    x = torch.randn(1, 48, 2, 4, 6)
    context = tiny_models.zero_text_context()
    from comfyui_litevsr.nodes.backbone import make_denoiser

    with torch.no_grad():
        comfy.model_management.load_models_gpu([wan22])
        bare = wan22.model.apply_model(x, torch.full((1,), 0.5), c_crossattn=context, transformer_options={})
        ours = make_denoiser(patched)(x, 0.5, latent["samples"], latent["samples"])
    torch.testing.assert_close(ours, bare, atol=1e-5, rtol=0)
