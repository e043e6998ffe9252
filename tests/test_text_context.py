"""The DiT's text context, chosen as adapters.text_context says (CONDITIONING > the text encoder's empty prompt >
the adapter file's stored context > zeros), driven through the Attach, Train and Save nodes with a real CLIP: a
tiny umT5 with the real key names and tokenizer format, built from ComfyUI's own Wan text-encoder classes."""
import logging

import pytest
import torch

import folder_paths
import nodes as comfy_nodes
from comfyui_litevsr.nodes.adapters import NEW_ADAPTER, new_adapter
from comfyui_litevsr.nodes.backbone import backbone_signature, find_attachment
from comfyui_litevsr.nodes.core.adapter_file import load_adapter, save_adapter
from comfyui_litevsr.nodes.model_nodes import LiteVSRAttachAdapter
from comfyui_litevsr.nodes.train_nodes import (LiteVSRDegradation, LiteVSRSaveAdapter, LiteVSRTrainAdapter,
                                               LiteVSRVideoDataset)
from tools import tiny_models

WARNING = "Connect Wan's text encoder (umt5"


@pytest.fixture(scope="module")
def text_encoder(tmp_path_factory):
    return tiny_models.load_tiny_umt5(tiny_models.save_tiny_umt5(tmp_path_factory.mktemp("umt5") / "umt5.safetensors"))


@pytest.fixture(scope="module")
def empty_prompt(text_encoder):
    """The stock CLIPTextEncode's conditioning for the empty prompt: what the DiT saw for 'no prompt'."""
    (conditioning,) = comfy_nodes.CLIPTextEncode().encode(text_encoder, "")
    return conditioning[0][0]


@pytest.fixture
def models_folder(tmp_path, monkeypatch):
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "litevsr", ([str(tmp_path)], {".safetensors"}))
    return tmp_path


def run(node, *args, **kwargs):
    with torch.inference_mode():
        return node.execute(*args, **kwargs).result


def attached_context(model, adapter=NEW_ADAPTER, **context_inputs):
    (patched,) = run(LiteVSRAttachAdapter, model, adapter, "direct", 0, **context_inputs)
    return find_attachment(patched).context


def zero_warnings(caplog):
    return [record for record in caplog.records if record.levelno == logging.WARNING and WARNING in record.message]


def test_tiny_umt5_is_a_wan_text_encoder(text_encoder, empty_prompt):
    tokens = text_encoder.tokenize("")["umt5xxl"][0]
    assert [token for token, _ in tokens[:2]] == [1, 0] and len(tokens) == 512  # end, then padding to 512
    assert empty_prompt.shape == (1, 512, 4096)
    assert empty_prompt[0, 0].any() and not empty_prompt[0, 1:].any()  # umT5 zeroes the padding's outputs


def test_text_encoder_gives_the_empty_prompt_context(tiny_dit, text_encoder, empty_prompt, caplog):
    with caplog.at_level(logging.WARNING, logger="LiteVSR"):
        context = attached_context(tiny_dit, text_encoder=text_encoder)
    assert torch.equal(context, empty_prompt)
    assert not zero_warnings(caplog)


def test_without_any_context_the_zero_context_is_used_and_named(tiny_dit, caplog):
    with caplog.at_level(logging.WARNING, logger="LiteVSR"):
        context = attached_context(tiny_dit)
    assert context.shape == (1, 512, 4096) and not context.any()
    (warning,) = zero_warnings(caplog)
    assert "only right for stand-in test models" in warning.message and "'Load CLIP' with type wan" in warning.message


def test_precedence_conditioning_encoder_stored(tiny_dit, text_encoder, empty_prompt, models_folder, caplog):
    signature = backbone_signature(tiny_dit)
    stored = torch.zeros(1, 512, 4096)
    stored[:, :3] = torch.randn(1, 3, 4096, generator=torch.Generator().manual_seed(0))
    save_adapter(models_folder / "stored.safetensors", new_adapter(signature, "direct", 0), stored)
    given = torch.randn(1, 512, 4096, generator=torch.Generator().manual_seed(1))
    with caplog.at_level(logging.WARNING, logger="LiteVSR"):
        assert torch.equal(attached_context(tiny_dit, "stored.safetensors"), stored)
        assert torch.equal(attached_context(tiny_dit, "stored.safetensors", text_encoder=text_encoder), empty_prompt)
        assert torch.equal(attached_context(tiny_dit, "stored.safetensors", conditioning=[[given, {}]],
                                            text_encoder=text_encoder), given)
    assert not zero_warnings(caplog)


def test_a_context_of_another_width_is_refused_naming_the_encoder(tiny_dit):
    with pytest.raises(ValueError, match=r"reads 4096-wide umt5 embeddings: use Wan's umt5_xxl text encoder"):
        attached_context(tiny_dit, conditioning=[[torch.randn(1, 77, 768), {}]])


def train_node_inputs(tmp_path, monkeypatch, test_clip):
    """The Train node's inputs at their defaults, one quick step on the test clip."""
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(tmp_path))
    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path / "output"))
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / test_clip.name).write_bytes(test_clip.read_bytes())
    (dataset,) = run(LiteVSRVideoDataset, "clips", 5, 32, 32, 1, 0)
    degradation, _ = run(LiteVSRDegradation, "light", 4, "", None, 0)
    settings = {spec.id: spec.default for spec in LiteVSRTrainAdapter.define_schema().inputs
                if getattr(spec, "default", None) is not None}
    return {**settings, "dataset": dataset, "degradation": degradation, "adapter": NEW_ADAPTER, "steps": 1,
            "validation_every": 0, "checkpoint_every": 0}


def test_training_stores_the_encoder_context_and_attaching_reuses_it(tiny_dit, tiny_vae, text_encoder, empty_prompt,
                                                                     models_folder, tmp_path, monkeypatch, test_clip,
                                                                     caplog):
    inputs = train_node_inputs(tmp_path, monkeypatch, test_clip)
    with caplog.at_level(logging.WARNING, logger="LiteVSR"):
        _, trained, _, _ = run(LiteVSRTrainAdapter, model=tiny_dit, vae=tiny_vae, text_encoder=text_encoder, **inputs)
        assert torch.equal(trained["context"], empty_prompt)
        (name,) = run(LiteVSRSaveAdapter, trained, "trained")
        _, stored = load_adapter(str(models_folder / name), backbone_signature(tiny_dit))
        assert torch.equal(stored, empty_prompt)
        assert torch.equal(attached_context(tiny_dit, name), empty_prompt)  # no text encoder connected now
    assert not zero_warnings(caplog)
