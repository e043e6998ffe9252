"""Adapters for a MODEL: a fresh one, one from a file or from the Attach/Train nodes' choice, and attaching it with
its text context (text_context: the one place that chooses it). The nodes and the headless tools build their
adapters here."""
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


ZERO_CONTEXT_WARNING = (
    "LiteVSR: the text context is all zeros (no conditioning or text encoder connected, and the adapter file stores "
    "none, or zeros): the frozen cross-attention never saw that in training. Connect Wan's text encoder (umt5, "
    "'Load CLIP' with type wan) to the Attach, Train or Distil node, or pass --text-encoder to the tools; the zero "
    "context is only right for stand-in test models.")


def zero_context(signature):
    """All zeros [1, TEXT_TOKENS, text_dim]: the context of last resort (stand-in test models have no encoder)."""
    return torch.zeros(1, TEXT_TOKENS, signature.text_dim)


def empty_prompt_context(text_encoder):
    """What `text_encoder` (a CLIP) makes of the empty prompt, as CLIPTextEncode encodes "": [1, L, width]."""
    return text_encoder.encode_from_tokens(text_encoder.tokenize(""))


def text_context(signature, conditioning=None, text_encoder=None, stored=None):
    """The DiT's cross-attention context, the first there is of: `conditioning` (a CONDITIONING), the empty-prompt
    embedding of `text_encoder` (a CLIP: Wan's umt5), the context `stored` in the adapter file, the zero context.
    The frozen cross-attention was trained on umt5 embeddings, where "no prompt" is the empty prompt's embedding:
    an all-zero context, whatever its source, is logged as a warning every time."""
    if conditioning is not None:
        context, source = conditioning[0][0], "the conditioning"
    elif text_encoder is not None:
        context, source = empty_prompt_context(text_encoder), "the text encoder"
    elif stored is not None:
        context, source = stored, "the adapter file's stored context"
    else:
        context, source = zero_context(signature), "the zero context"
    if context.ndim != 3 or context.shape[-1] != signature.text_dim:
        raise ValueError(f"{source} gives a text context of shape {list(context.shape)}, but the {signature.family} "
                         f"DiT reads {signature.text_dim}-wide umt5 embeddings: use Wan's umt5_xxl text encoder "
                         "('Load CLIP' with type wan).")
    if not context.any():
        log.warning(ZERO_CONTEXT_WARNING)
    return context


def with_adapter(model, module, stored=None, conditioning=None, text_encoder=None):
    """A clone of `model` with `module` attached, its text context chosen by `text_context` (`stored`: the context
    of the adapter's file)."""
    signature = backbone_signature(model)
    return attach_adapter(model, module, text_context(signature, conditioning, text_encoder, stored))


def check_distilled_steps(model, steps):
    """Logs one warning when the adapter attached to `model` was distilled for another number of steps."""
    attachment = find_attachment(model)
    message = attachment and distilled_steps_warning(attachment.adapter_patcher.model.distilled, steps)
    if message:
        log.warning("LiteVSR: %s", message)
