"""InfVSR's reference encoder: the Swin geometry read from the weights (RAM's published one included), DAPE's merge
against InfVSR's grouped-convolution formula, shifted-window attention against a direct computation over the whole
map, the pooled token, preprocessing against torchvision, .pth and .safetensors loading, refusals, and the encoder
under ComfyUI's ModelPatcher."""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tools import tiny_models
from comfyui_litevsr.nodes.core import reference_encoder as ref
from comfyui_litevsr.nodes.core.pickle_file import PickleRefused
from comfyui_litevsr.nodes.core.swin import PatchMerging, SwinGeometry, SwinTransformerBlock, swin_geometry
from comfyui_litevsr.nodes.reference import LoadedReferenceEncoder, load_reference_encoder

RAM_SWIN_L = SwinGeometry(in_channels=3, patch=4, embed_dim=192, depths=(2, 2, 18, 2), heads=(6, 12, 24, 48),
                          windows=(12, 12, 12, 12), mlp_ratio=4, image_size=384)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    return tiny_models.save_tiny_reference(tmp_path_factory.mktemp("infvsr"))


@pytest.fixture(scope="module")
def tiny_states():
    ram = tiny_models.tiny_ram_state_dict()
    return ram, tiny_models.tiny_dape_state_dict(ram)


def frame(height=50, width=70, seed=0):
    return torch.rand(height, width, 3, generator=torch.Generator().manual_seed(seed))


def test_ram_swin_l_geometry_is_read_back_from_its_weight_shapes():
    with torch.device("meta"):
        shapes = ref.ReferenceEncoder(RAM_SWIN_L, context_dim=512).state_dict()
    assert swin_geometry(shapes, ref.SWIN_PREFIX) == RAM_SWIN_L
    assert RAM_SWIN_L.tokens == 12 * 12 + 1 and RAM_SWIN_L.features == 1536
    assert shapes["image_proj.weight"].shape == (512, 1536)


def test_tiny_geometry_is_read_from_the_weights(tiny_states):
    module = ref.build_reference_encoder(*tiny_states)
    assert module.visual_encoder.geometry == SwinGeometry(**tiny_models.TINY_SWIN)
    assert module.image_proj.out_features == 512


def test_every_second_block_is_shifted_by_half_a_window_unless_the_map_is_one_window(tiny_states):
    layers = ref.build_reference_encoder(*tiny_states).visual_encoder.layers
    assert [[block.shift for block in layer.blocks] for layer in layers] == [[0, 1], [0, 1], [0, 1], [0, 0]]


def test_patch_merging_concatenates_each_2x2_group_in_the_original_order():
    merge = PatchMerging(dim=2, resolution=4)
    x = torch.randn(1, 16, 2)
    grid = x.unflatten(1, (4, 4))
    groups = torch.cat([grid[:, 0::2, 0::2], grid[:, 1::2, 0::2], grid[:, 0::2, 1::2], grid[:, 1::2, 1::2]], -1)
    with torch.no_grad():
        torch.testing.assert_close(merge(x), merge.reduction(merge.norm(groups.flatten(1, 2))), rtol=0, atol=0)


def test_dape_merge_is_infvsrs_grouped_convolution_on_query_and_value_rows():
    dim, rank = 6, 2
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(3 * dim, dim, generator=gen)
    lora_a, lora_b = torch.randn(2 * rank, dim, generator=gen), torch.randn(2 * dim, rank, generator=gen)
    key = "visual_encoder.layers.0.blocks.0.attn.qkv"
    weights = {f"{key}.weight": qkv, f"{key}.bias": torch.randn(3 * dim, generator=gen),
               "image_proj.weight": torch.randn(4, dim, generator=gen)}
    merged = ref.merge_dape(weights, {f"{key}.lora_A": lora_a, f"{key}.lora_B": lora_b})

    delta = F.conv1d(lora_a[None], lora_b[..., None], groups=2)[0]  # [2 * dim, dim]
    out = merged[f"{key}.weight"]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[:dim], qkv[:dim] + delta[:dim] / 8, rtol=0, atol=1e-6)
    torch.testing.assert_close(out[2 * dim:], qkv[2 * dim:] + delta[dim:] / 8, rtol=0, atol=1e-6)
    assert torch.equal(out[dim:2 * dim], qkv[dim:2 * dim])
    assert not torch.equal(out[:dim], qkv[:dim]) and not torch.equal(out[2 * dim:], qkv[2 * dim:])
    assert all(merged[k] is weights[k] for k in (f"{key}.bias", "image_proj.weight"))


def direct_block(block, x):
    """The block computed over the whole map at once: token p attends to token q iff both fall in one window of
    the map rolled by -shift and in one region of the unrolled map, with the bias of their offset in the rolled
    map. Nothing is partitioned, rolled back or masked by the module's own tables."""
    r, w, s, attn = block.resolution, block.window, block.shift, block.attn
    y, x_ = (torch.arange(r * r) // r - s) % r, (torch.arange(r * r) % r - s) % r  # rolled coordinates
    band = lambda c: (c >= r - w).long() + (c >= r - s).long() if s else torch.zeros_like(c)  # noqa: E731
    same = lambda v: v[:, None] == v[None, :]  # noqa: E731
    allowed = same(y // w) & same(x_ // w) & same(band(y)) & same(band(x_))
    row = ((y % w)[:, None] - (y % w)[None, :] + w - 1) * (2 * w - 1) + (x_ % w)[:, None] - (x_ % w)[None, :] + w - 1
    bias = attn.relative_position_bias_table[row].permute(2, 0, 1)  # [heads, r*r, r*r]
    h = block.norm1(x)
    q, k, v = attn.qkv(h).unflatten(-1, (3, attn.heads, -1)).permute(2, 0, 3, 1, 4)
    logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5 + bias
    mixed = (logits.masked_fill(~allowed, float("-inf")).softmax(-1) @ v).transpose(1, 2).flatten(2)
    x = x + attn.proj(mixed)
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize("resolution, window, shift", [(6, 3, 1), (6, 3, 0), (8, 4, 2), (3, 3, 0)],
                         ids=["shifted", "unshifted", "shifted-even-window", "one-window-plain-attention"])
def test_window_attention_matches_a_direct_computation(resolution, window, shift):
    torch.manual_seed(0)
    block = SwinTransformerBlock(dim=8, heads=2, window=window, resolution=resolution, shift=shift, mlp_ratio=2)
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_()
        x = torch.randn(2, resolution * resolution, 8)
        torch.testing.assert_close(block(x), direct_block(block, x), rtol=1e-5, atol=1e-5)


def test_output_is_the_pooled_token_then_the_final_map(tiny_states):
    module = ref.build_reference_encoder(*tiny_states)
    context = module.context(frame())
    assert context.shape == (1, 3 * 3 + 1, 512) and module.tokens == 10
    # image_proj is affine, so the projected pooled token is the mean of the projected map tokens
    torch.testing.assert_close(context[:, 0], context[:, 1:].mean(dim=1), rtol=1e-5, atol=1e-5)


def test_preparation_is_torchvisions_resize_and_normalise():
    from torchvision import transforms

    image = frame(50, 140)
    expected = transforms.Compose([
        transforms.Resize((96, 96), interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.Normalize(ref.IMAGENET_MEAN, ref.IMAGENET_STD)])(image.permute(2, 0, 1)[None])
    prepared = ref.prepare_reference(image, 96)
    torch.testing.assert_close(prepared, expected, rtol=0, atol=1e-6)
    assert torch.equal(ref.prepare_reference(image.permute(2, 0, 1)[None], 96), prepared)


def test_pth_and_converted_safetensors_give_the_same_context(tiny_files, tmp_path):
    ram_path, dape_path = tiny_files
    ram = torch.load(ram_path, weights_only=True)["model"]
    converted_ram = {k: v for k, v in ram.items() if k.startswith(("visual_encoder.", "image_proj."))}
    save_file(converted_ram, str(tmp_path / "ram.safetensors"))
    save_file(torch.load(dape_path, weights_only=True), str(tmp_path / "dape.safetensors"))
    from_pickles = load_reference_encoder(str(ram_path), str(dape_path)).encode(frame())
    converted = load_reference_encoder(str(tmp_path / "ram.safetensors"), str(tmp_path / "dape.safetensors"))
    assert torch.equal(converted.encode(frame()), from_pickles)


def test_encoder_runs_under_comfyuis_model_patcher(tiny_files, tiny_states):
    import comfy.model_management
    import comfy.model_patcher

    encoder = load_reference_encoder(*map(str, tiny_files))
    assert isinstance(encoder, LoadedReferenceEncoder)
    assert isinstance(encoder.patcher, comfy.model_patcher.ModelPatcher)
    context = encoder.encode(frame())
    assert context.shape == (1, encoder.tokens, 512) and context.dtype == torch.float32
    assert context.device == comfy.model_management.intermediate_device()
    assert any(loaded.model is encoder.patcher for loaded in comfy.model_management.current_loaded_models)
    assert torch.equal(context, ref.build_reference_encoder(*tiny_states).context(frame()))
    assert torch.equal(encoder.encode(frame().permute(2, 0, 1)[None]), context)


def one_line_refusal(error_type, call):
    with pytest.raises(error_type) as caught:
        call()
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_dape_missing_a_blocks_lora_is_refused_naming_the_file(tiny_states, tmp_path):
    ram, dape = tiny_states
    torch.save({"model": ram}, tmp_path / "ram.pth")
    missing = "visual_encoder.layers.2.blocks.1.attn.qkv.lora_A"
    torch.save({k: v for k, v in dape.items() if k != missing}, tmp_path / "my_dape.pth")
    message = one_line_refusal(ref.ReferenceFileRefused, lambda: load_reference_encoder(
        str(tmp_path / "ram.pth"), str(tmp_path / "my_dape.pth")))
    assert "my_dape.pth" in message and "DAPE.pth" in message and "layers.2.blocks.1.attn.qkv" in message


def test_dape_of_another_rank_layout_is_refused(tiny_states):
    ram, dape = tiny_states
    key = "visual_encoder.layers.0.blocks.0.attn.qkv.lora_B"
    message = one_line_refusal(ref.ReferenceFileRefused, lambda: ref.merge_dape(
        ref.encoder_weights(ram), {**dape, key: dape[key].T.contiguous()}))
    assert "DAPE.pth" in message and "[2r, 16]" in message


@pytest.mark.parametrize("damage, expected", [
    (lambda ram: {k: v for k, v in ram.items() if not k.startswith("visual_encoder.")}, "no 'visual_encoder.'"),
    (lambda ram: {k: v for k, v in ram.items() if k != "visual_encoder.norm.weight"}, "missing visual_encoder.norm"),
    (lambda ram: {k: v for k, v in ram.items() if k != "image_proj.weight"}, "image_proj.weight"),
    (lambda ram: {**ram, "visual_encoder.head.weight": torch.zeros(3)}, "unexpected visual_encoder.head"),
], ids=["not-ram", "missing-norm", "missing-projection", "extra-head"])
def test_ram_file_that_does_not_fit_is_refused_naming_the_file(tiny_states, tmp_path, damage, expected):
    ram, dape = tiny_states
    torch.save({"model": damage(ram)}, tmp_path / "other.pth")
    torch.save(dape, tmp_path / "DAPE.pth")
    message = one_line_refusal(ref.ReferenceFileRefused, lambda: load_reference_encoder(
        str(tmp_path / "other.pth"), str(tmp_path / "DAPE.pth")))
    assert "other.pth" in message and "ram_swin_large_14m.pth" in message and expected in message


def test_ram_pickle_without_its_model_entry_is_refused(tiny_states, tmp_path):
    ram, dape = tiny_states
    torch.save(ram, tmp_path / "flat.pth")
    torch.save(dape, tmp_path / "DAPE.pth")
    message = one_line_refusal(PickleRefused, lambda: load_reference_encoder(
        str(tmp_path / "flat.pth"), str(tmp_path / "DAPE.pth")))
    assert "flat.pth" in message and "'model'" in message
