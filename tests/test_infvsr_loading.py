"""InfVSR's DiT as a stock ComfyUI MODEL (nodes/infvsr.py) and its pickles converted to safetensors (tools/infvsr.py):
the released .ckpt and its conversion load to the same model; a pickle carrying code is refused by both without the
code running; the stock loader cannot load the file at all, which is why the loader exists."""
import inspect
import io
import pickle
import subprocess
import sys
import zipfile

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import REPO
from tools import tiny_models
from comfyui_litevsr.nodes.backbone import backbone_signature
from comfyui_litevsr.nodes.core.geometry import BackboneSignature
from comfyui_litevsr.nodes.core.pickle_file import PickleRefused, read_tensor_pickle
from comfyui_litevsr.nodes.infvsr import NotInfVSR, is_infvsr, load_infvsr_dit
from comfyui_litevsr.nodes.infvsr_nodes import LiteVSRLoadInfVSR, LiteVSRLoadInfVSRReference


def convert(source, target):
    return subprocess.run([sys.executable, "-m", "tools.infvsr", "convert", str(source), str(target)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def infvsr_dir(tmp_path_factory):
    import folder_paths

    folder = tmp_path_factory.mktemp("diffusion_models")
    folder_paths.add_model_folder_path("diffusion_models", str(folder))
    return folder


@pytest.fixture(scope="module")
def infvsr_ckpt(infvsr_dir):
    return tiny_models.save_tiny_infvsr(infvsr_dir / "InfVSR.ckpt")


@pytest.fixture(scope="module")
def converted(infvsr_ckpt):
    """(path, the converter's output) of the ckpt converted by `python -m tools.infvsr convert`."""
    target = infvsr_ckpt.with_name("InfVSR.safetensors")
    done = convert(infvsr_ckpt, target)
    assert done.returncode == 0, done.stderr
    return target, done.stdout


def dit_of(model):
    return model.model.diffusion_model


def output(model, seed=0):
    """The model's prediction on a fixed random latent, sigma and 512-wide context."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 2, 8, 8, generator=gen)
    context = torch.randn(1, 8, 512, generator=gen)
    with torch.no_grad():
        return model.model.apply_model(x, torch.tensor([0.7]), c_crossattn=context)


def test_converter_says_what_it_converted_and_keeps_every_tensor(infvsr_ckpt, converted):
    path, stdout = converted
    assert stdout.strip().splitlines() == [stdout.strip()] and "InfVSR DiT" in stdout and "bfloat16" in stdout
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata() == {"source": "InfVSR.ckpt", "kind": "dit"}
    released = read_tensor_pickle(infvsr_ckpt)
    tensors = load_file(str(path))
    assert tensors.keys() == released.keys()
    assert all(tensors[key].dtype == torch.bfloat16 and torch.equal(tensors[key], released[key]) for key in released)


def test_ckpt_and_converted_safetensors_load_to_the_same_model(infvsr_ckpt, converted):
    from_ckpt, from_safetensors = load_infvsr_dit(str(infvsr_ckpt)), load_infvsr_dit(str(converted[0]))
    assert type(from_ckpt.model) is type(from_safetensors.model) and type(from_ckpt.model).__name__ == "WAN21"
    for model in (from_ckpt, from_safetensors):
        assert model.model.model_config.unet_config["text_dim"] == 512 == dit_of(model).text_embedding[0].in_features
    ckpt_state, safetensors_state = dit_of(from_ckpt).state_dict(), dit_of(from_safetensors).state_dict()
    assert ckpt_state.keys() == safetensors_state.keys()
    assert all(torch.equal(ckpt_state[key], safetensors_state[key]) for key in ckpt_state)
    assert torch.equal(output(from_ckpt), output(from_safetensors))


def test_infvsr_is_told_from_a_stock_wan_and_recognised_as_wan21(infvsr_ckpt, tiny_dit):
    infvsr = load_infvsr_dit(str(infvsr_ckpt))
    assert is_infvsr(infvsr) and not is_infvsr(tiny_dit)
    assert backbone_signature(infvsr) == BackboneSignature("wan2.1", dim=256, num_layers=2, num_heads=2,
                                                           latent_channels=16, vae_stride=8, text_dim=512)


def test_newer_comfyui_reloads_it_for_a_deep_copy(infvsr_ckpt):
    """ComfyUI >= 0.1x deep-copies a MODEL (training, Dynamic VRAM delegates) by calling its loader again."""
    model = load_infvsr_dit(str(infvsr_ckpt))
    if "force_deepcopy" not in inspect.signature(model.clone).parameters:
        pytest.skip("this ComfyUI's clone() shares the model; it never reloads")
    copy = model.clone(force_deepcopy=True)
    assert copy.model is not model.model and is_infvsr(copy)
    assert torch.equal(output(copy), output(model))


def test_a_checkpoint_prefix_is_stripped_as_comfyui_strips_it(infvsr_ckpt, tmp_path):
    released = read_tensor_pickle(infvsr_ckpt)
    prefixed = tmp_path / "InfVSR_prefixed.ckpt"
    torch.save({f"model.diffusion_model.{key}": tensor for key, tensor in released.items()}, prefixed)
    assert torch.equal(output(load_infvsr_dit(str(prefixed))), output(load_infvsr_dit(str(infvsr_ckpt))))


@pytest.mark.parametrize("which", ["ckpt", "safetensors"])
def test_the_stock_loader_cannot_load_infvsr(infvsr_ckpt, converted, which):
    """Why the loader exists: ComfyUI builds every Wan2.1 DiT for 4096-wide umt5 text."""
    import comfy.sd

    path = infvsr_ckpt if which == "ckpt" else converted[0]
    with pytest.raises(RuntimeError, match=r"text_embedding\.0\.weight.*\[256, 512\].*\[256, 4096\]"):
        comfy.sd.load_diffusion_model(str(path))


def test_a_stock_wan_is_refused_by_the_infvsr_loader(tiny_dit_path):
    with pytest.raises(NotInfVSR, match="4096-wide text context.*'Load Diffusion Model'"):
        load_infvsr_dit(str(tiny_dit_path))


class Payload:
    """Unpickled by anything but the weights-only reader, this creates `marker`: proof that the file's code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def save_with_payload(path, marker, writer):
    # copies: the reader memory-maps the file, which is rewritten in place below
    state = {key: tensor.clone() for key, tensor in read_tensor_pickle(tiny_models.save_tiny_infvsr(path)).items()}
    state["blocks.0.payload"] = Payload(marker)  # an otherwise valid InfVSR state dict
    if writer == "torch.save":
        torch.save(state, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump(state, handle)


def unpickle_unsafely(path, writer):
    """A plain unpickler on the file's pickle (torch.save's is data.pkl in a zip; its tensor storages are
    persistent ids, answered with empty storages of their dtype and size here)."""
    if writer == "torch.save":
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
            unpickler = pickle.Unpickler(io.BytesIO(archive.read(name)))
            unpickler.persistent_load = lambda pid: torch.storage.TypedStorage(pid[4], dtype=pid[1].dtype,
                                                                               _internal=True)
            return unpickler.load()
    with open(path, "rb") as handle:
        return pickle.load(handle)


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_a_pickle_carrying_code_is_refused_and_never_runs(tmp_path, writer):
    marker, source, out_folder = tmp_path / "payload_ran", tmp_path / "InfVSR.ckpt", tmp_path / "out"
    out_folder.mkdir()
    save_with_payload(source, marker, writer)

    with pytest.raises(PickleRefused, match="InfVSR.ckpt"):
        load_infvsr_dit(str(source))
    done = convert(source, out_folder / "InfVSR.safetensors")
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "InfVSR.ckpt" in done.stderr, done.stderr
    assert list(out_folder.iterdir()) == []  # neither the output nor a temporary file
    assert not marker.exists()

    unpickle_unsafely(source, writer)  # the payload is live: a plain unpickler runs it
    assert marker.exists()


def test_converter_keeps_only_rams_image_encoder(tmp_path):
    encoder = {"visual_encoder.layers.0.blocks.0.attn.qkv.weight": torch.randn(6, 2),
               "image_proj.weight": torch.randn(4, 3)}
    dropped = {"visual_encoder.layers.0.blocks.0.attn.relative_position_index": torch.arange(4),
               "visual_encoder.layers.0.blocks.0.attn_mask": torch.zeros(2, 2),
               "tagging_head.layer.0.weight": torch.randn(2, 2), "label_embed": torch.randn(3, 4)}
    torch.save({"model": {**encoder, **dropped}}, tmp_path / "ram_swin_large_14m.pth")
    done = convert(tmp_path / "ram_swin_large_14m.pth", tmp_path / "ram.safetensors")
    assert done.returncode == 0 and "RAM Swin-L image encoder, 2 tensors" in done.stdout, done.stderr
    kept = load_file(str(tmp_path / "ram.safetensors"))
    assert kept.keys() == encoder.keys() and all(torch.equal(kept[key], encoder[key]) for key in encoder)


def test_converter_tells_dape_and_refuses_other_files(tmp_path):
    lora = {"visual_encoder.layers.0.blocks.0.attn.qkv.lora_A": torch.randn(8, 2),
            "visual_encoder.layers.0.blocks.0.attn.qkv.lora_B": torch.randn(4, 4)}
    torch.save(lora, tmp_path / "DAPE.pth")
    done = convert(tmp_path / "DAPE.pth", tmp_path / "DAPE.safetensors")
    assert done.returncode == 0 and "DAPE" in done.stdout, done.stderr
    with safe_open(str(tmp_path / "DAPE.safetensors"), "pt") as handle:
        assert handle.metadata() == {"source": "DAPE.pth", "kind": "dape"} and set(handle.keys()) == set(lora)

    torch.save({"some.weight": torch.randn(2)}, tmp_path / "other.pth")
    done = convert(tmp_path / "other.pth", tmp_path / "other.safetensors")
    assert done.returncode == 2 and "none of InfVSR's files" in done.stderr
    assert not (tmp_path / "other.safetensors").exists()


@pytest.mark.parametrize("weight_dtype, dtype", [("bf16", torch.bfloat16), ("fp8_e4m3fn", torch.float8_e4m3fn)])
def test_load_node_lists_diffusion_models_and_loads_infvsr(infvsr_ckpt, converted, weight_dtype, dtype):
    options = LiteVSRLoadInfVSR.define_schema().inputs[0].options
    assert {infvsr_ckpt.name, converted[0].name} <= set(options)
    model = LiteVSRLoadInfVSR.execute(converted[0].name, weight_dtype).result[0]
    assert is_infvsr(model) and dit_of(model).blocks[0].self_attn.q.weight.dtype == dtype
    assert torch.isfinite(output(model)).all()


def test_reference_node_loads_both_files_from_the_infvsr_folder(tmp_path):
    import folder_paths

    from tools import tiny_models

    folder_paths.add_model_folder_path("infvsr", str(tmp_path))
    ram, dape = tiny_models.save_tiny_reference(tmp_path)
    assert {ram.name, dape.name} <= set(LiteVSRLoadInfVSRReference.define_schema().inputs[0].options)
    encoder = LiteVSRLoadInfVSRReference.execute(ram.name, dape.name).result[0]
    context = encoder.encode(torch.rand(40, 60, 3))
    assert context.shape == (1, encoder.tokens, 512) and torch.isfinite(context).all()
