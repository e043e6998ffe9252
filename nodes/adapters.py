"""Adapters for a MODEL: a fresh one, one from a file or from the Attach/Train nodes' choice, and attaching it with
its text context. The nodes and the headless tools build their adapters here."""
import logging

import torch

import folder_paths

from .backbone import attach_adapter, backbone_signature, find_attachment
from .core.adapter import AdapterConfig, StateAwareAdapter
from .core.adapter_file import distilled_steps_warning, load_adapter
from .core.geometry import TEXT_TOKENS
from .extension_paths import ADAPTER_FOLDER

NEW_ADAPTER = "new (zero-init)"
log = logging.getLogger("LiteVSR")


def new_adapter(signature, mode, rank, seed=0):
    """A fresh adapter; seeded so a fresh start (and training from it) is reproducible."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return StateAwareAdapter(AdapterConfig(signature, mode=mode, rank=rank))


def adapter_from_file(signature, path, injection, rank, seed=0):
    """(module, stored text context or None): the adapter file at `path`, or a fresh adapter where there is none
    (`injection`, `rank` and `seed` shape only that fresh one)."""
    if not path:
        return new_adapter(signature, injection, rank, seed), None
    return load_adapter(str(path), signature)


def adapter_path(name):
    """The full path of adapter file `name` (as listed in models/litevsr)."""
    return folder_paths.get_full_path_or_raise(ADAPTER_FOLDER, name)


def adapter_from_choice(signature, adapter, injection, rank, seed=0):
    """(module, stored text context or None) for a combo choice: NEW_ADAPTER or a file in models/litevsr."""
    path = None if adapter == NEW_ADAPTER else adapter_path(adapter)
    return adapter_from_file(signature, path, injection, rank, seed)


def empty_context(signature):
    """The text context used when neither a text encoder nor the adapter file gives one: all zeros."""
    return torch.zeros(1, TEXT_TOKENS, signature.text_dim)


def with_adapter(model, module, context):
    """A clone of `model` with `module` attached; no text `context` means `empty_context` (no text encoder)."""
    if context is None:
        context = empty_context(backbone_signature(model))
    return attach_adapter(model, module, context)


def check_distilled_steps(model, steps):
    """Logs one warning when the adapter attached to `model` was distilled for another number of steps."""
    attachment = find_attachment(model)
    message = attachment and distilled_steps_warning(attachment.adapter_patcher.model.distilled, steps)
    if message:
        log.warning("LiteVSR: %s", message)
