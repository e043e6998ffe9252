"""A one-step student distilled from a teacher adapter: its record in the adapter file round-trips, a broken one is
refused in one line."""
import json

import pytest

from comfyui_litevsr.nodes.adapters import new_adapter
from comfyui_litevsr.nodes.backbone import backbone_signature
from comfyui_litevsr.nodes.core.adapter_file import (DISTILLED_KEY, AdapterFileError, distillation_metadata,
                                                     load_adapter, read_distillation, save_adapter)

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
