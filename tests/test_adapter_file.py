"""Adapter files: exact round trip, and every broken or foreign file refused before anything is deserialised."""
import json
import pickle
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from comfyui_litevsr.nodes.core.adapter import AdapterConfig, StateAwareAdapter, remember
from comfyui_litevsr.nodes.core.adapter_file import (FORMAT_VERSION, AdapterFileError, check_backbone, load_adapter,
                                                     read_header, save_adapter)
from comfyui_litevsr.nodes.core.geometry import BackboneSignature

SIG = BackboneSignature("wan2.1", dim=128, num_layers=2, num_heads=1, latent_channels=16, vae_stride=8)
OTHER = BackboneSignature("wan2.1", dim=256, num_layers=2, num_heads=2, latent_channels=16, vae_stride=8)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def saved(tmp_path):
    adapter = StateAwareAdapter(AdapterConfig(SIG, mode="shared_blocks", rank=4))
    context = torch.zeros(1, 512, 4096)
    context[0, :5] = torch.randn(5, 4096)
    path = tmp_path / "a.safetensors"
    save_adapter(path, adapter, context)
    return path, adapter, context


@pytest.fixture(autouse=True)
def no_torch_load(monkeypatch):
    """The loader must never reach torch.load (pickle), whatever the file."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called")
    monkeypatch.setattr(torch, "load", refuse)


def test_round_trip_is_exact(saved):
    path, adapter, context = saved
    loaded, loaded_context = load_adapter(path, SIG)
    assert loaded.config == adapter.config and loaded.config.memory
    assert any(name.startswith("memory.") for name in read_header(path))  # the memory's weights travel too
    for (name, a), (_, b) in zip(adapter.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(loaded_context, context)
    assert path.stat().st_size < 2 * 4096 * 4 * 8 + sum(t.numel() * 4 for t in adapter.state_dict().values()) + 65536
    assert not list(path.parent.glob(".litevsr-*"))  # no temporary left behind


def test_trained_memory_round_trips(tmp_path):
    adapter = StateAwareAdapter(AdapterConfig(SIG, window=(1, 4, 4)))
    with torch.no_grad():
        for out in adapter.memory.out:  # as after training: the memory moves the features
            out.weight.normal_(std=0.02)
    save_adapter(tmp_path / "m.safetensors", adapter)
    loaded, _ = load_adapter(tmp_path / "m.safetensors", SIG)
    z = torch.randn(1, 16, 2, 8, 8)
    memory = remember(None, torch.randn(1, 16, 5, 8, 8))
    t = torch.tensor([400.0])
    with torch.no_grad():
        expected = adapter.features(z, z, t, memory)
        assert torch.equal(loaded.features(z, z, t, memory), expected)
        assert not torch.equal(loaded.features(z, z, t), expected)


def test_file_from_before_the_memory_loads_as_before(tmp_path):
    """A version-1 file (its config has no `memory`, its tensors no memory weights) loads with the memory off and
    computes the features it computed before."""
    torch.manual_seed(0)
    old = StateAwareAdapter(AdapterConfig(SIG, mode="shared_blocks", rank=4, memory=False))
    path = tmp_path / "old.safetensors"
    save_adapter(path, old)
    metadata = read_header(path)["__metadata__"]
    config = json.loads(metadata["config"])
    del config["memory"]
    from safetensors.torch import load_file
    save_file(load_file(str(path)), str(path), metadata={**metadata, "format_version": "1",
                                                         "config": json.dumps(config, sort_keys=True)})
    loaded, _ = load_adapter(path, SIG)
    assert not loaded.config.memory and loaded.memory is None
    torch.manual_seed(0)  # today's adapter from the same seed: equal weights but for the memory's, built last
    today = StateAwareAdapter(AdapterConfig(SIG, mode="shared_blocks", rank=4))
    z, t = torch.randn(1, 16, 2, 8, 8), torch.tensor([400.0])
    with torch.no_grad():
        expected = old.features(z, z, t)
        assert torch.equal(loaded.features(z, z, t), expected)
        assert torch.equal(today.features(z, z, t), expected)


@pytest.mark.matrix("Models", "adapter from another backbone")
def test_other_backbone_refused_with_both_signatures(saved):
    path, _, _ = saved
    with pytest.raises(AdapterFileError) as err:
        load_adapter(path, OTHER)
    assert SIG.describe() in str(err.value) and OTHER.describe() in str(err.value)


@pytest.mark.matrix("Models", "adapter file that is a pickle renamed to .safetensors")
def test_pickle_renamed_to_safetensors_is_refused(tmp_path):
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"weight": [1.0] * 100}))
    with pytest.raises(AdapterFileError, match="not a valid safetensors file"):
        load_adapter(path, SIG)


@pytest.mark.matrix("Models", "truncated safetensors")
def test_truncated_file_is_refused(saved):
    path, _, _ = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFileError, match="truncated"):
        load_adapter(path, SIG)


@pytest.mark.matrix("Models", "header with a huge declared size")
def test_huge_declared_header_is_refused(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    with pytest.raises(AdapterFileError, match="header"):
        read_header(path)


def test_tiny_and_garbage_files_are_refused(tmp_path):
    for name, data in {"empty": b"", "short": b"abc", "garbage": struct.pack("<Q", 4) + b"\xff\xfe{["}.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        with pytest.raises(AdapterFileError):
            load_adapter(path, SIG)


@pytest.mark.matrix("Models", "wrong or missing metadata")
def test_foreign_safetensors_and_bad_metadata_are_refused(tmp_path, saved):
    plain = tmp_path / "lora.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(AdapterFileError, match="not a LiteVSR adapter"):
        load_adapter(plain, SIG)
    broken = tmp_path / "broken.safetensors"
    save_file({"x": torch.zeros(2)}, str(broken), metadata={"format": "litevsr-adapter", "format_version": "1"})
    with pytest.raises(AdapterFileError, match="missing or invalid LiteVSR metadata"):
        load_adapter(broken, SIG)


@pytest.mark.matrix("Models", "adapter from a newer format version")
def test_newer_format_version_is_refused(tmp_path, saved):
    path, _, _ = saved
    header = read_header(path)
    newer = tmp_path / "newer.safetensors"
    from safetensors.torch import load_file
    save_file(load_file(str(path)), str(newer), metadata={**header["__metadata__"], "format_version": str(FORMAT_VERSION + 1)})
    with pytest.raises(AdapterFileError, match="newer LiteVSR"):
        load_adapter(newer, SIG)


def test_check_backbone_accepts_own_signature():
    check_backbone(AdapterConfig(SIG), SIG)


@pytest.mark.matrix("Models", "torch.load only with weights_only=True, never reached for a non-safetensors adapter")
def test_no_unsafe_torch_load_in_the_pack():
    """No code path calls torch.load without weights_only=True (the adapter loader never calls it at all)."""
    offenders = []
    for source in list((REPO / "nodes").rglob("*.py")) + [REPO / "__init__.py"]:
        for call in re.finditer(r"torch\.load\(([^)]*)\)", source.read_text()):
            if "weights_only=True" not in call.group(1):
                offenders.append(f"{source.relative_to(REPO)}: {call.group(0)}")
    assert not offenders, offenders
