"""A zero-initialised adapter attached through ComfyUI's wrapper/patch hooks leaves the frozen backbone unchanged."""
import pytest
import torch

from comfyui_litevsr.nodes.backbone import attach_adapter, backbone_signature, make_denoiser
from comfyui_litevsr.nodes.core.adapter import AdapterConfig, StateAwareAdapter

from tools import tiny_models


def bare_denoise(model, x, sigma, context):
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    sigmas = torch.full((x.shape[0],), sigma)
    return model.model.apply_model(x, sigmas, c_crossattn=context, transformer_options={})


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 3, 8, 12, generator=gen)
    lr = torch.randn(1, 16, 3, 8, 12, generator=gen)
    return x, lr, tiny_models.zero_text_context()


@pytest.mark.parametrize("mode,rank", [("direct", 0), ("direct", 8), ("shared_blocks", 0), ("shared_blocks", 8)])
def test_zero_init_adapter_is_identity(tiny_dit, inputs, mode, rank):
    x, lr, context = inputs
    adapter = StateAwareAdapter(AdapterConfig(backbone_signature(tiny_dit), mode=mode, rank=rank))
    patched = attach_adapter(tiny_dit, adapter, context)
    with torch.no_grad():
        expected = bare_denoise(tiny_dit, x, 0.7, context)
        got = make_denoiser(patched)(x, 0.7, lr, lr)
    if mode == "direct":
        # Adding an exact zero to each block output changes no bit.
        assert torch.equal(got, expected)
    else:
        # The main tokens share a batch with the condition tokens, which may reorder float sums in the matmuls.
        assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()

    # The hooks really run: once the injections are non-zero the output moves.
    with torch.no_grad():
        for injection in adapter.injections:
            injection.up.weight.normal_(std=0.02)
        moved = make_denoiser(patched)(x, 0.7, lr, lr)
    assert (moved - expected).abs().max() > 1e-3


def test_bare_model_untouched_by_attach(tiny_dit, inputs):
    """attach_adapter works on a clone: the MODEL other nodes hold keeps no LiteVSR wrapper or patch."""
    x, lr, context = inputs
    adapter = StateAwareAdapter(AdapterConfig(backbone_signature(tiny_dit)))
    attach_adapter(tiny_dit, adapter, context)
    assert not tiny_dit.model_options.get("transformer_options", {}).get("patches_replace")
    with pytest.raises(ValueError, match="no LiteVSR adapter"):
        make_denoiser(tiny_dit)
