"""The backbone registry (nodes/core/backbones.py): its facts live in one file, the front end, the model manifest and
the stand-ins agree with it, and a new Wan family is added from this file alone and used end to end."""
import re
import subprocess

import pytest
import torch

from tools import tiny_models
from comfyui_litevsr.nodes.backbone import UnsupportedBackbone, attach_adapter, backbone_signature, make_denoiser
from comfyui_litevsr.nodes import model_files
from comfyui_litevsr.nodes.core import backbones, memory
from comfyui_litevsr.nodes.core.backbones import Family, Recognition, Release, registered
from comfyui_litevsr.nodes.core.dit_tiling import latent_tiling, training_tile
from comfyui_litevsr.nodes.core.geometry import BackboneSignature
from comfyui_litevsr.nodes.adapters import new_adapter

from conftest import REPO


def load(state):
    import comfy.sd

    return comfy.sd.load_diffusion_model_state_dict(state)


def repo_text_files():
    """Tracked and new (not ignored) files of this checkout, as text."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                                capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    for name in sorted(set(listed.decode().split("\0")) - {""}):
        path = REPO / name
        data = path.read_bytes() if path.is_file() else b"\0"
        if b"\0" not in data:
            yield name, data.decode(errors="replace")


def test_published_ffn_widths_live_in_one_file():
    """The FFN widths of the published releases are written in exactly one file outside tests/. bench/results/ is
    left out: its JSON files are recorded measurements, which name the geometry they measured. Word boundaries, so a
    file size in weights/models.json that happens to contain the digits does not count."""
    widths = {release.ffn_dim for release in backbones.releases()}
    assert widths == {8960, 13824, 14336}
    pattern = re.compile(r"\b(" + "|".join(map(str, sorted(widths))) + r")\b")
    holders = sorted(name for name, text in repo_text_files()
                     if not name.startswith(("tests/", "bench/results/")) and pattern.search(text))
    assert holders == ["nodes/core/backbones.py"]


def test_front_end_grid_is_the_registry_finest():
    text = (REPO / "js" / "litevsr_rules.js").read_text()
    (value,) = re.findall(r"^export const MIN_GRID_PX = (\d+);", text, re.M)
    assert int(value) == min(family.grid_px for family in backbones.families()) == 16


def test_model_manifest_families_are_registry_releases():
    """The manifest's backbone families are the registry's releases; its model families (InfVSR, run as published)
    are not backbones adapters attach to, and none of them takes a release's id."""
    manifest = model_files.load_manifest()
    releases = {release.id for release in backbones.releases()}
    assert {family.id for family in manifest.families if family.kind == "backbone"} == releases
    assert {family.id for family in manifest.families if family.kind == "model"} == {"infvsr"}


@pytest.mark.parametrize("family", backbones.families(), ids=lambda family: family.id)
def test_every_family_has_a_stand_in_recognised_as_it(family):
    model = load(tiny_models.tiny_wan_dit_state_dict(dim=128, num_layers=1, family=family.id))
    assert backbone_signature(model) == family.signature(dim=128, num_layers=1, num_heads=1)


def test_published_signatures_and_training_releases():
    for release in backbones.releases():
        assert backbones.release_of(release.signature) is release
        assert backbones.training_release(release.signature) is release
        assert backbones.release(release.id) is release
    tiny = backbones.WAN21.signature(dim=256, num_layers=2, num_heads=2)
    assert backbones.release_of(tiny) is None
    assert backbones.training_release(tiny).id == "wan2.1-t2v-1.3b"  # the fewest trained pixels: the safer tile
    with pytest.raises(ValueError, match="no training resolution known for backbone family 'wan9'"):
        training_tile(BackboneSignature("wan9", dim=128, num_layers=1, num_heads=1, latent_channels=16, vae_stride=8))
    with pytest.raises(ValueError, match="unknown backbone family 'wan9'; known: wan2.1, wan2.2"):
        backbones.family("wan9")


def test_registration_refuses_what_would_be_ambiguous():
    wan21 = backbones.WAN21
    taken = [
        (Family("wan2.1", "again", Recognition("X", "Y"), 16, 8, 7000, 6000), "already registered"),
        (Family("copy", "copy", wan21.recognition, 16, 8, 7000, 6000), "would be recognised as wan2.1"),
        (Family("other-vae", "other", Recognition("X", "Y"), 16, 8, 1, 1), "stride 8 like wan2.1's but other facts"),
    ]
    for family, message in taken:
        with pytest.raises(ValueError, match=message):
            backbones.register(family)
    same_vae = Family("same-vae", "same VAE", Recognition("X", "Y"), 16, 8, 7000, 6000)
    with pytest.raises(ValueError, match="not of family same-vae"):
        backbones.register(same_vae, backbones.release("wan2.1-t2v-1.3b"))
    assert [family.id for family in backbones.families()] == ["wan2.1", "wan2.2"]
    with registered(same_vae):  # a second family on the same VAE is fine
        assert backbones.vae_family(8) is wan21
    assert [family.id for family in backbones.families()] == ["wan2.1", "wan2.2"]


# A made-up Wan family, registered from here alone: the same 48 latent channels as Wan2.2 but its own latent format
# (so told apart from Wan2.2 by what ComfyUI calls it, not by channels), a VAE of stride 32 and so a 64 px grid.
WAN_TEST = Family("wan-test", "Wan-Test 2B", Recognition("WAN22", "WanTest"), latent_channels=48, vae_stride=32,
                  vae_decode_per_px=9000, vae_encode_per_px=4000)
WAN_TEST_2B = Release("wan-test-2b", WAN_TEST.signature(dim=2048, num_layers=28, num_heads=16), ffn_dim=8192,
                      training_px=(1024, 640))


def wan_test_stand_in():
    """The family's stand-in: its tiny DiT, with the latent format ComfyUI would give such a model."""
    import comfy.latent_formats

    class WanTest(comfy.latent_formats.Wan22):
        pass

    model = load(tiny_models.tiny_wan_dit_state_dict(dim=128, num_layers=2, family="wan-test"))
    model.model.latent_format = WanTest()
    return model


def test_a_new_family_is_one_entry_and_its_stand_in():
    import comfy.model_management

    with registered(WAN_TEST, WAN_TEST_2B):
        model = wan_test_stand_in()
        signature = backbone_signature(model)
        assert signature == WAN_TEST.signature(dim=128, num_layers=2, num_heads=1)
        assert (signature.family, signature.latent_channels, signature.vae_stride, signature.grid_px) == \
            ("wan-test", 48, 32, 64)
        plain = load(tiny_models.tiny_wan_dit_state_dict(dim=128, num_layers=2, family="wan-test"))
        assert backbone_signature(plain).family == "wan2.2"  # same channels, recognised as what ComfyUI says it is

        # consumers: default DiT tile, grid checks, memory planner, parameter count, adapter shapes and identity
        assert training_tile(signature) == training_tile(WAN_TEST_2B.signature) == (20, 32)  # 640x1024 px / 32
        assert latent_tiling(signature, 512) == ((16, 16), (2, 2))
        with pytest.raises(ValueError, match="not a multiple of the wan-test DiT grid"):
            latent_tiling(signature, 480)
        assert memory.decode_bytes(32, 4, 4, 2) == 9000 * (4 * 32) ** 2 * 2
        assert memory.encode_bytes(32, 128, 128, 2) == 4000 * 128 * 128 * 2
        assert memory.ffn_dim_of(WAN_TEST_2B.signature) == 8192
        assert memory.dit_weight_bytes(WAN_TEST_2B.signature, 2) == 2 * WAN_TEST_2B.parameters
        state = tiny_models.tiny_wan_dit_state_dict(dim=128, num_layers=2, family="wan-test", ffn_dim=384)
        assert backbones.dit_parameters(signature, 384) == sum(tensor.numel() for tensor in state.values())
        assert backbones.release("wan-test-2b").stand_in_shape == dict(family="wan-test", dim=2048, num_layers=28,
                                                                       ffn_dim=8192)

        context = tiny_models.zero_text_context()
        adapter = new_adapter(signature, "shared_blocks", 8)
        assert adapter.structure_embed.in_channels == 48 and len(adapter.injections) == 2
        x = torch.randn(1, 48, 2, 4, 6)
        with torch.no_grad():
            comfy.model_management.load_models_gpu([model])
            bare = model.model.apply_model(x, torch.full((1,), 0.5), c_crossattn=context, transformer_options={})
            ours = make_denoiser(attach_adapter(model, adapter, context))(x, 0.5, x, x)
        torch.testing.assert_close(ours, bare, atol=1e-5, rtol=0)

        with pytest.raises(UnsupportedBackbone, match=r"needs a Wan2.1 T2V \(1.3B/14B\) or Wan2.2 TI2V-5B or "
                                                      r"Wan-Test 2B model"):
            backbone_signature(load(tiny_models.tiny_ltxv_state_dict()))

    # gone again: the stand-in is refused, the family and its release are unknown
    with pytest.raises(UnsupportedBackbone, match="got WAN22"):
        backbone_signature(model)
    with pytest.raises(ValueError, match="unknown Wan release 'wan-test-2b'"):
        backbones.release("wan-test-2b")
    assert backbones.release_of(WAN_TEST_2B.signature) is None
