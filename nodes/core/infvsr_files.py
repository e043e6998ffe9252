"""InfVSR's released weight files (a DiT checkpoint, RAM's Swin-L, DAPE's LoRA): which one a state dict is, and
the tensors of it that are worth keeping. Pure torch: the converter runs without ComfyUI."""
from .pickle_file import tensor_dict
from .reference_encoder import encoder_weights

DIT, RAM, DAPE = "dit", "ram", "dape"
KIND_TITLES = {DIT: "InfVSR DiT", RAM: "RAM Swin-L image encoder", DAPE: "DAPE LoRA for RAM's encoder"}
DIT_CONTEXT_KEY = "text_embedding.0.weight"  # [dim, context dim]: 512 for InfVSR, 4096 (umt5) for a stock Wan
DAPE_SUFFIXES = (".lora_A", ".lora_B")


class NotAnInfVSRFile(ValueError):
    """A readable weight file that is none of InfVSR's three."""


def infvsr_tensors(obj, name):
    """(kind, {name: tensor}) of the object read from one of InfVSR's files: the DiT (everything, prefix and dtype
    as stored), RAM (its checkpoint's 'model' entry, only the image encoder) or DAPE (everything)."""
    if isinstance(obj, dict) and "model" in obj:
        # the image encoder's tensors, as the reference encoder keeps them: a few hundred MiB of several GiB
        return RAM, encoder_weights(tensor_dict(obj, name, "model"), name)
    state = tensor_dict(obj, name)
    if any(key.endswith(DIT_CONTEXT_KEY) for key in state) and any(key.endswith("head.modulation") for key in state):
        return DIT, state
    if all(key.endswith(DAPE_SUFFIXES) for key in state):
        return DAPE, state
    raise NotAnInfVSRFile(f"{name} is none of InfVSR's files (its DiT, RAM's ram_swin_large_14m.pth, DAPE.pth).")
