"""Third-party PyTorch pickles (.pth / .ckpt), read once to be converted to safetensors.

Only PyTorch's weights-only unpickler reads them: it admits tensors, numbers, strings and plain containers and
refuses any other global before calling it, so a file carrying code is refused and nothing in it runs. The
result is then checked to be a (possibly nested) mapping of names to tensors."""
import os
import pickle
import warnings
import zipfile

import torch

PICKLE_SUFFIXES = (".pth", ".ckpt", ".pt", ".bin")


class PickleRefused(ValueError):
    """A pickle that holds more than tensors in plain containers, or no readable pickle at all."""


def is_pickle_name(name):
    return str(name).lower().endswith(PICKLE_SUFFIXES)


def read_tensor_pickle(path):
    """The object in a PyTorch pickle, restricted to tensors in plain containers (dicts, lists, numbers, strings);
    raises PickleRefused with one line otherwise. Zip-format files are memory-mapped, not read into RAM."""
    name = os.path.basename(path)
    try:
        with warnings.catch_warnings():  # torch's note on a non-default pickle protocol; the outcome is reported
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        # torch's message is long advice about weights_only; the unpickler's own complaint is what matters
        reason = next((line for line in lines if "global" in line.lower() or line.startswith("Unsupported")),
                      lines[0] if lines else "")
        raise PickleRefused(f"{name} holds more than tensors, so it was refused without running any of it "
                            f"({reason[:160]}). Only plain weight files are read; get the file from its "
                            "official source.") from None
    except (RuntimeError, EOFError, OSError) as error:
        raise PickleRefused(f"{name} is not a readable PyTorch weight file: {str(error).splitlines()[0][:160]}") \
            from None


def tensor_dict(obj, name, key=None):
    """obj[key] (or obj) as {name: tensor}; anything but a flat mapping of str to tensors is refused."""
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            raise PickleRefused(f"{name} has no '{key}' entry: it is not the file expected here.")
        obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise PickleRefused(f"{name} holds no state dict (a {type(obj).__name__}).")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise PickleRefused(f"{name}: entries that are not tensors: {', '.join(bad[:5])}"
                            + (" ..." if len(bad) > 5 else ""))
    return obj
