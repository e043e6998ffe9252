"""The training nodes' own contracts, called in-process as ComfyUI calls them (under inference mode)."""
import json
from dataclasses import fields
from types import SimpleNamespace

import pytest
import torch

import folder_paths
from comfyui_litevsr.nodes.adapters import new_adapter
from comfyui_litevsr.nodes.core.adapter_file import read_adapter_config
from comfyui_litevsr.nodes.core.degrade import degrade_clip, with_overrides
from comfyui_litevsr.nodes.core.distill import DistillConfig
from comfyui_litevsr.nodes.core.sampling import START_MODES
from comfyui_litevsr.nodes.core.training import TrainConfig
from comfyui_litevsr.nodes.distill_nodes import LiteVSRDistillAdapter
from comfyui_litevsr.nodes.backbone import backbone_signature
from comfyui_litevsr.nodes.train_nodes import (LiteVSRDegradation, LiteVSRSaveAdapter, LiteVSRTrainAdapter,
                                               LiteVSRVideoDataset, trained_adapter)
from comfyui_litevsr.nodes.training_run import train_adapter


def run(node, *args):
    with torch.inference_mode():
        return node.execute(*args).result


def test_degradation_node_applies_overrides_and_previews_reproducibly():
    frames = torch.rand(5, 32, 48, 3, generator=torch.Generator().manual_seed(0))
    overrides = '{"stage1": {"noise_prob": 0.0}, "final": {"codec_prob": 0.0}}'
    degradation, preview = run(LiteVSRDegradation, "heavy", 4, overrides, frames, 7)
    assert degradation["scale"] == 4
    assert degradation["config"] == with_overrides("heavy", {"stage1": {"noise_prob": 0.0},
                                                             "final": {"codec_prob": 0.0}})
    assert preview.shape == (5, 8, 12, 3)
    expected, _ = degrade_clip(frames, 4, degradation["config"], 7)
    assert torch.equal(preview, expected)
    assert run(LiteVSRDegradation, "light", 2, "", None, 0)[1] is None


def test_degradation_node_names_bad_json():
    with pytest.raises(ValueError, match="not valid JSON"):
        run(LiteVSRDegradation, "standard", 4, "{stage1: 1}", None, 0)


@pytest.mark.matrix("Paths", "Video Dataset folder outside input")
def test_dataset_node_resolves_relative_folders_against_input(tmp_path, test_clip, monkeypatch):
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(tmp_path))
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / test_clip.name).write_bytes(test_clip.read_bytes())
    (dataset,) = run(LiteVSRVideoDataset, "clips", 5, 32, 32, 1, 0)
    assert [info.path.parent for info in dataset.videos] == [tmp_path / "clips"]
    assert dataset.sample(0).shape == (5, 32, 32, 3)
    with pytest.raises(ValueError, match="give the folder"):
        run(LiteVSRVideoDataset, "  ", 5, 32, 32, 1, 0)


def test_save_node_counts_up_and_writes_a_loadable_adapter(tmp_path, monkeypatch, tiny_dit):
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "litevsr", ([str(tmp_path)], {".safetensors"}))
    adapter = {"adapter": new_adapter(backbone_signature(tiny_dit), "direct", 4), "context": None,
               "metadata": {"train_steps": "3"}}
    assert run(LiteVSRSaveAdapter, adapter, "runs/mine") == ("runs/mine_00001.safetensors",)
    assert run(LiteVSRSaveAdapter, adapter, "runs/mine") == ("runs/mine_00002.safetensors",)
    config, metadata = read_adapter_config(str(tmp_path / "runs" / "mine_00002.safetensors"))
    assert config.rank == 4 and metadata["train_steps"] == "3"
    with pytest.raises(ValueError, match="filename_prefix"):
        run(LiteVSRSaveAdapter, adapter, "../escape")


def test_validation_crop_is_checked_before_training(tiny_dit):
    # a validation crop off the token grid would otherwise fail only at the first validation, after training
    good, bad = SimpleNamespace(crop_width=64, crop_height=64), SimpleNamespace(crop_width=64, crop_height=56)
    with pytest.raises(ValueError, match=r"validation crop 64x56 must be a multiple of 16 px"):
        train_adapter(tiny_dit, None, good, None, 4, None, None, validation_dataset=bad)


def test_distil_node_offers_every_distillation_setting_and_the_train_nodes_run_settings():
    distil = {spec.id: spec for spec in LiteVSRDistillAdapter.define_schema().inputs}
    for field in fields(DistillConfig):  # every setting, with the objective's own default
        assert distil[field.name].default == field.default, field.name
    train = [spec.id for spec in LiteVSRTrainAdapter.define_schema().inputs]
    objective_only = {"adapter", "injection", "rank", "max_unrolls", "loss_weighting", "max_loss_weight", "start",
                      "start_sigma", "segments", "segment_overlap"}
    assert [name for name in train if name not in objective_only] == [name for name in distil if name in train]
    assert "teacher" in distil and objective_only.isdisjoint(distil)


def test_train_node_start_and_segment_widgets_come_last_and_go_into_the_adapter_metadata():
    """`start`/`start_sigma` and `segments`/`segment_overlap` follow every older widget and are optional with
    TrainConfig's defaults (saved workflows keep their widget order, saved API prompts stay valid); the saved
    adapter's train_config records them."""
    *_, start, start_sigma, segments, overlap = LiteVSRTrainAdapter.define_schema().inputs
    newer = (start, start_sigma, segments, overlap)
    assert [spec.id for spec in newer] == ["start", "start_sigma", "segments", "segment_overlap"]
    assert all(spec.optional for spec in newer) and start.options == list(START_MODES)
    assert [spec.default for spec in newer] == [getattr(TrainConfig(), spec.id) for spec in newer]
    config = TrainConfig(start="lr_latent", start_sigma=0.3, segments=2, segment_overlap=1)
    metadata = trained_adapter(config, SimpleNamespace(adapter=None, context=None))["metadata"]
    recorded = json.loads(metadata["train_config"])
    assert [recorded[spec.id] for spec in newer] == ["lr_latent", 0.3, 2, 1]
