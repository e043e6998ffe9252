"""Adapter files: safetensors with a metadata header. Never unpickled, checked before anything is loaded."""
import json
import os
import struct
import tempfile

import torch
from safetensors.torch import load_file, save_file

from .adapter import AdapterConfig, StateAwareAdapter
from .geometry import BackboneSignature

FORMAT_NAME = "litevsr-adapter"
# 2: the config records `memory` (the adapter's memory of earlier chunks, with its weights). A reader of version 1
# would take such a file for a broken one; version-1 files load here with memory False, exactly as before.
FORMAT_VERSION = 2
MAX_HEADER_BYTES = 64 * 1024 * 1024  # safetensors itself refuses larger headers
CONTEXT_KEY = "text_context"
# A student distilled from a teacher adapter: its metadata value is JSON {"steps", "teacher", "teacher_sha256",
# "teacher_steps"} (the steps it was distilled for; the teacher's file name, SHA-256 and steps).
DISTILLED_KEY = "distilled"
DISTILLED_FIELDS = {"steps": int, "teacher": str, "teacher_sha256": str, "teacher_steps": int}


class AdapterFileError(ValueError):
    pass


def read_header(path):
    """The JSON header of a safetensors file, validated by hand so a pickle or a broken file never reaches a loader."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise AdapterFileError(f"{os.path.basename(path)} is not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise AdapterFileError(
                f"{os.path.basename(path)} is not a valid safetensors file: it declares a {header_len}-byte header in a "
                f"{size}-byte file (a pickle/.pt/.ckpt renamed to .safetensors, or a truncated download). "
                "LiteVSR only loads safetensors adapters; re-export or re-download it.")
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterFileError(f"{os.path.basename(path)} has a corrupt safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise AdapterFileError(f"{os.path.basename(path)} has a corrupt safetensors header")
    data_len = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if 8 + header_len + data_len > size:
        raise AdapterFileError(f"{os.path.basename(path)} is truncated: {size} bytes, the header needs "
                               f"{8 + header_len + data_len}. Re-download or re-save it.")
    return header


def read_adapter_config(path):
    metadata = read_header(path).get("__metadata__") or {}
    name = os.path.basename(path)
    if metadata.get("format") != FORMAT_NAME:
        raise AdapterFileError(f"{name} is a safetensors file but not a LiteVSR adapter (no '{FORMAT_NAME}' metadata): "
                               "pick an adapter written by Save Adapter (LiteVSR) or tools/train.py")
    try:
        version = int(metadata["format_version"])
        config = AdapterConfig.from_dict(json.loads(metadata["config"]))
    except (KeyError, ValueError, TypeError) as err:
        raise AdapterFileError(f"{name} has missing or invalid LiteVSR metadata ({err!r}): re-download it, or "
                               "re-save it with Save Adapter (LiteVSR)") from None
    if version > FORMAT_VERSION:
        raise AdapterFileError(f"{name} was written by a newer LiteVSR (adapter format {version}; this pack reads up "
                               f"to {FORMAT_VERSION}). Update ComfyUI-LiteVSR.")
    return config, metadata


def distillation_metadata(steps, teacher_name, teacher_sha256, teacher_steps):
    """The extra metadata (save_adapter's `extra_metadata`) that marks a student distilled from a teacher adapter."""
    record = {"steps": steps, "teacher": teacher_name, "teacher_sha256": teacher_sha256, "teacher_steps": teacher_steps}
    check_distillation(record, "the distillation record")
    return {DISTILLED_KEY: json.dumps(record, sort_keys=True)}


def check_distillation(record, name):
    valid = isinstance(record, dict) and all(
        type(record.get(field)) is kind and (record[field] > 0 if kind is int else record[field] != "")
        for field, kind in DISTILLED_FIELDS.items())
    if not valid:
        raise AdapterFileError(f"{name} has an invalid '{DISTILLED_KEY}' record ({record!r}): it needs "
                               "positive integer steps and teacher_steps and a teacher name and teacher_sha256; "
                               "re-save it with the distillation that made it")


def distillation_record(metadata, name):
    """The distillation record of an adapter file's metadata, or None for an adapter that was not distilled."""
    if DISTILLED_KEY not in metadata:
        return None
    try:
        record = json.loads(metadata[DISTILLED_KEY])
    except json.JSONDecodeError:
        record = metadata[DISTILLED_KEY]
    check_distillation(record, name)
    return record


def read_distillation(path):
    """The distillation record ({"steps", "teacher", "teacher_sha256", "teacher_steps"}) of an adapter file, or
    None; read from the header only."""
    return distillation_record(read_header(path).get("__metadata__") or {}, os.path.basename(path))


def distilled_steps_warning(record, steps):
    """The one line to log when an adapter distilled for `record["steps"]` is sampled with `steps`, else None."""
    if record is None or steps == record["steps"]:
        return None
    distilled = f"{record['steps']} step" + ("s" if record["steps"] > 1 else "")
    return (f"this adapter was distilled for {distilled} from a {record['teacher_steps']}-step teacher "
            f"({record['teacher']}); steps={steps} runs it outside what it was trained for: set steps to "
            f"{record['steps']}")


def load_adapter(path, backbone: BackboneSignature = None):
    """(adapter module, text context [1, L, text_dim]) from a file; refuses a file made for another backbone. The
    module's `distilled` is the file's distillation record (None for an adapter that was not distilled)."""
    config, metadata = read_adapter_config(path)
    distilled = distillation_record(metadata, os.path.basename(path))
    if backbone is not None:
        check_backbone(config, backbone, os.path.basename(path))
    tensors = load_file(path)
    context = tensors.pop(CONTEXT_KEY, None)
    adapter = StateAwareAdapter(config)
    adapter.distilled = distilled
    missing, unexpected = adapter.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise AdapterFileError(f"{os.path.basename(path)} does not match its own config: missing {missing[:4]}, "
                               f"unexpected {unexpected[:4]}")
    if context is not None:
        context = pad_context(context, int(metadata.get("context_length", context.shape[1])))
    return adapter, context


def check_backbone(config, backbone, name="the adapter"):
    if config.backbone != backbone:
        raise AdapterFileError(f"{name} was trained for {config.backbone.describe()}, but the MODEL is "
                               f"{backbone.describe()}. Load the backbone it was made for, or pick another adapter.")


def save_adapter(path, adapter: StateAwareAdapter, context=None, extra_metadata=None):
    """Writes to a temporary file in the same folder and renames it, so a crash never leaves half a file."""
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in adapter.state_dict().items()}
    metadata = {}
    if context is not None:
        # umt5 pads with zeros to 512 tokens: store only the meaningful prefix.
        tensors[CONTEXT_KEY] = trim_context(context.detach()).contiguous().cpu()
        metadata["context_length"] = str(context.shape[1])
    metadata.update({"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
                "config": json.dumps(adapter.config.to_dict(), sort_keys=True),
                "mode": adapter.config.mode, "rank": str(adapter.config.rank),
                "backbone": adapter.config.backbone.to_json(), **(extra_metadata or {})})
    save_atomic(tensors, path, metadata)
    return path


TEMPORARY_PREFIX = ".litevsr-"


def save_atomic(tensors, path, metadata):
    """safetensors written to a hidden temporary file in the same folder and renamed: a crash never leaves half a
    file under the final name."""
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, suffix=".tmp", dir=folder)
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata=metadata)
        os.chmod(temporary, 0o644)  # mkstemp makes owner-only files; other users (a ComfyUI service) must read it
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def trim_context(context):
    """Drops trailing all-zero tokens (umt5 padding); the sampler pads back to the DiT's text length."""
    nonzero = context.abs().flatten(2).amax(dim=-1).amax(dim=0) > 0
    length = int(nonzero.nonzero().max()) + 1 if nonzero.any() else 1
    return context[:, :length]


def pad_context(context, length):
    return torch.nn.functional.pad(context, (0, 0, 0, length - context.shape[1])) if context.shape[1] < length else context
