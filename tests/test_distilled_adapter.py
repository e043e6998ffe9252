"""A one-step student distilled from a teacher adapter: its record in the adapter file round-trips, a broken one is
refused in one line, and sampling it at another step count warns (Sampler node and streaming run)."""
import json
import logging

import pytest
import torch

from comfyui_litevsr.nodes.adapters import new_adapter
from comfyui_litevsr.nodes.backbone import backbone_signature
from comfyui_litevsr.nodes.core.adapter_file import (DISTILLED_KEY, AdapterFileError, distillation_metadata,
                                                     load_adapter, read_distillation, save_adapter)
from comfyui_litevsr.nodes.core.video_io import VideoReader, VideoWriter
from comfyui_litevsr.nodes.latents import vsr_latent
from comfyui_litevsr.nodes.model_nodes import LiteVSRAttachAdapter
from comfyui_litevsr.nodes.sample_nodes import LiteVSRSampler
from comfyui_litevsr.nodes.streaming import StreamOptions, StreamUpscale

TEACHER_SHA = "ab" * 32
RECORD = {"steps": 1, "teacher": "teacher.safetensors", "teacher_sha256": TEACHER_SHA, "teacher_steps": 4}


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_dit):
    """models/litevsr with a distilled student and a plain adapter for the tiny Wan."""
    import folder_paths

    folder = tmp_path_factory.mktemp("litevsr_distilled")
    folder_paths.add_model_folder_path("litevsr", str(folder))
    signature = backbone_signature(tiny_dit)
    save_adapter(folder / "student.safetensors", new_adapter(signature, "direct", 0),
                 extra_metadata=distillation_metadata(1, "teacher.safetensors", TEACHER_SHA, 4))
    save_adapter(folder / "plain.safetensors", new_adapter(signature, "direct", 0))
    return folder


def test_the_record_round_trips_and_rides_on_the_loaded_module(adapter_dir):
    student = adapter_dir / "student.safetensors"
    assert read_distillation(student) == RECORD
    adapter, _ = load_adapter(student)
    assert adapter.distilled == RECORD


def test_a_plain_adapter_has_no_record(adapter_dir):
    plain = adapter_dir / "plain.safetensors"
    assert read_distillation(plain) is None
    assert load_adapter(plain)[0].distilled is None


@pytest.mark.parametrize("value", [
    "{not json",
    json.dumps([1]),
    json.dumps({**RECORD, "steps": 0}),
    json.dumps({**RECORD, "teacher_steps": "4"}),
    json.dumps({key: value for key, value in RECORD.items() if key != "teacher_sha256"}),
])
def test_a_malformed_record_is_refused_in_one_line(tmp_path, tiny_dit, value):
    path = tmp_path / "broken.safetensors"
    save_adapter(path, new_adapter(backbone_signature(tiny_dit), "direct", 0), extra_metadata={DISTILLED_KEY: value})
    for read in (read_distillation, load_adapter):
        with pytest.raises(AdapterFileError, match="broken.safetensors has an invalid 'distilled' record") as err:
            read(path)
        assert "\n" not in str(err.value)


def test_the_writer_cannot_write_a_record_the_reader_refuses():
    with pytest.raises(AdapterFileError, match="invalid 'distilled' record"):
        distillation_metadata(1, "", TEACHER_SHA, 4)


def distilled_warnings(caplog):
    return [record.getMessage() for record in caplog.records
            if record.levelno == logging.WARNING and "distilled" in record.getMessage()]


def attach(model, name):
    return LiteVSRAttachAdapter.execute(model, name, "direct", 0, None).result[0]


def test_the_sampler_warns_once_outside_the_distilled_steps(tiny_dit, adapter_dir, caplog):
    student = attach(tiny_dit, "student.safetensors")
    latent = vsr_latent(torch.randn(1, 16, 2, 4, 6), frames=5, height=64, width=96)
    caplog.set_level(logging.WARNING, logger="LiteVSR")
    LiteVSRSampler.execute(student, latent, 0, 2, 5.0, "noise", 0.4)
    assert distilled_warnings(caplog) == [
        "LiteVSR: this adapter was distilled for 1 step from a 4-step teacher (teacher.safetensors); steps=2 "
        "runs it outside what it was trained for: set steps to 1"]
    caplog.clear()
    LiteVSRSampler.execute(student, latent, 0, 1, 5.0, "noise", 0.4)
    LiteVSRSampler.execute(attach(tiny_dit, "plain.safetensors"), latent, 0, 2, 5.0, "noise", 0.4)
    assert distilled_warnings(caplog) == []


def test_the_streaming_run_warns_outside_the_distilled_steps(tiny_dit, tiny_vae, adapter_dir, tmp_path, caplog):
    clip = tmp_path / "clip.mp4"
    with VideoWriter(clip, 8, 32, 32) as writer:
        writer.write(torch.rand(5, 32, 32, 3))
    student = attach(tiny_dit, "student.safetensors")
    caplog.set_level(logging.WARNING, logger="LiteVSR")
    for steps in (1, 3):
        options = StreamOptions(scale=2, steps=steps, shift=5.0, start="noise", start_sigma=0.4, seed=0,
                                chunk_frames=0, overlap_frames=4, scene_cut_threshold=0, dit_tile=0, decode_tile=0,
                                colour="none", crf=18)
        StreamUpscale(student, tiny_vae, VideoReader(clip), options)
    assert [message.split(";")[1] for message in distilled_warnings(caplog)] == [
        " steps=3 runs it outside what it was trained for: set steps to 1"]
