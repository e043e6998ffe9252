"""InfVSR's reference encoder: the visual tokens its Wan DiT cross-attends to in place of umT5 text.

RAM's Swin-L image encoder, with DAPE's LoRA merged into every attention's qkv projection, reads the first frame of
a scene; `image_proj` maps its tokens (the pooled one first) to the DiT's 512-wide text input. Everything is read
from the two files: the Swin's geometry from RAM's weights, the LoRA rank from DAPE's.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .swin import SwinTransformer, swin_geometry

RAM_FILE = "ram_swin_large_14m.pth"
DAPE_FILE = "DAPE.pth"
SWIN_PREFIX = "visual_encoder."
PROJECTION_PREFIX = "image_proj."
BUFFER_SUFFIXES = ("relative_position_index", "attn_mask")  # rebuilt from the geometry, never loaded
DAPE_DIVISOR = 8  # InfVSR's merge factor for DAPE's deltas (LoRA alpha over rank as DAPE was trained)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ReferenceFileRefused(ValueError):
    """A RAM or DAPE file that does not hold what InfVSR's reference encoder needs."""


def encoder_weights(ram_weights, name=RAM_FILE):
    """The Swin and projection tensors of a RAM state dict (the tagging heads and stored buffers dropped)."""
    kept = {key: value for key, value in ram_weights.items()
            if key.startswith((SWIN_PREFIX, PROJECTION_PREFIX)) and not key.endswith(BUFFER_SUFFIXES)}
    if not any(key.startswith(SWIN_PREFIX) for key in kept):
        raise ReferenceFileRefused(f"{name} holds no '{SWIN_PREFIX}' weights: it is not RAM's Swin-L ({RAM_FILE}).")
    return kept


def merge_dape(weights, dape, name=DAPE_FILE):
    """`weights` with DAPE merged into each `attn.qkv`, in float32, as InfVSR does. DAPE's lora_A [2r, dim] and
    lora_B [2*dim, r] are two rank-r pairs (a grouped 1x1 convolution): B[:dim] @ A[:r] adapts the query rows and
    B[dim:] @ A[r:] the value rows, both divided by DAPE_DIVISOR; the key rows are left as they are."""
    merged = dict(weights)
    for key, weight in weights.items():
        if not key.endswith(".attn.qkv.weight"):
            continue
        module = key[:-len(".weight")]
        lora_a, lora_b = (dape.get(f"{module}.lora_{part}") for part in "AB")
        if lora_a is None or lora_b is None:
            raise ReferenceFileRefused(f"{name} has no LoRA for {module}: it is not the DAPE ({DAPE_FILE}) of this "
                                       "RAM encoder.")
        dim, rank = weight.shape[1], lora_a.shape[0] // 2
        if lora_a.shape != (2 * rank, dim) or lora_b.shape != (2 * dim, rank):
            raise ReferenceFileRefused(f"{name}: {module}'s LoRA is {tuple(lora_a.shape)} x {tuple(lora_b.shape)}, "
                                       f"not [2r, {dim}] x [{2 * dim}, r]: it is not the DAPE ({DAPE_FILE}) of this "
                                       "RAM encoder.")
        lora_a, lora_b = lora_a.float(), lora_b.float()
        weight = weight.float().clone()
        weight[:dim] += lora_b[:dim] @ lora_a[:rank] / DAPE_DIVISOR
        weight[2 * dim:] += lora_b[dim:] @ lora_a[rank:] / DAPE_DIVISOR
        merged[key] = weight
    return merged


def prepare_reference(frame, size):
    """A frame [H, W, 3] (as in a ComfyUI IMAGE) or frames [B, 3, H, W], values 0..1 -> [B, 3, size, size] float32,
    resized bilinearly (antialiased, as torchvision's Resize does on tensors) and ImageNet-normalised."""
    pixels = frame.permute(2, 0, 1)[None] if frame.ndim == 3 else frame
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"a reference frame is [H, W, 3] or [B, 3, H, W], not {list(frame.shape)}")
    pixels = F.interpolate(pixels.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean, std = (torch.tensor(v, device=pixels.device).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return (pixels - mean) / std


class ReferenceEncoder(nn.Module):
    def __init__(self, geometry, context_dim):
        super().__init__()
        self.visual_encoder = SwinTransformer(geometry)
        self.image_proj = nn.Linear(geometry.features, context_dim)

    @property
    def tokens(self):
        return self.visual_encoder.geometry.tokens

    def forward(self, pixels):
        """Prepared pixels [B, 3, S, S] -> [B, tokens, context_dim]."""
        return self.image_proj(self.visual_encoder(pixels))

    def context(self, frame):
        """The DiT context of one reference frame (see prepare_reference): [1, tokens, context_dim] float32, on
        the module's device, computed in the module's dtype."""
        weight = self.image_proj.weight
        pixels = prepare_reference(frame.to(weight.device), self.visual_encoder.geometry.image_size)
        if pixels.shape[0] != 1:
            raise ValueError(f"one reference frame gives the context, not {pixels.shape[0]}")
        with torch.no_grad():
            return self(pixels.to(weight.dtype)).float()


def build_reference_encoder(ram_weights, dape_weights, ram_name=RAM_FILE, dape_name=DAPE_FILE):
    """The float32 ReferenceEncoder (eval, frozen) of a RAM state dict (its `visual_encoder.*` and `image_proj.*`
    entries; anything else is ignored) and DAPE's LoRA tensors. A file that does not fit is refused in one line
    naming it and the file expected."""
    weights = merge_dape(encoder_weights(ram_weights, ram_name), dape_weights, dape_name)
    try:
        geometry = swin_geometry(weights, SWIN_PREFIX)
        context_dim = weights[PROJECTION_PREFIX + "weight"].shape[0]
        module = ReferenceEncoder(geometry, context_dim)
    except KeyError as error:
        raise ReferenceFileRefused(f"{ram_name} is not RAM's Swin-L ({RAM_FILE}): no {error.args[0]}.") from None
    except ValueError as error:
        raise ReferenceFileRefused(f"{ram_name} is not RAM's Swin-L ({RAM_FILE}): {error}.") from None
    expected = module.state_dict()
    missing, unexpected = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
    misshapen = [key for key in expected.keys() & weights.keys() if weights[key].shape != expected[key].shape]
    if missing or unexpected or misshapen:
        found = ", ".join(f"{what} {keys[0]}" + (f" (+{len(keys) - 1})" if len(keys) > 1 else "")
                          for what, keys in (("missing", missing), ("unexpected", unexpected),
                                             ("misshapen", misshapen)) if keys)
        raise ReferenceFileRefused(f"{ram_name} does not fit RAM's Swin-L layout ({RAM_FILE}): {found}.")
    module.load_state_dict(weights)
    return module.eval().requires_grad_(False)
