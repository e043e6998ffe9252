"""Wan backbone geometry: the one source of truth for grids, strides and adapter shapes."""
import json
from dataclasses import asdict, dataclass

WAN_PATCH = (1, 2, 2)  # every Wan T2V DiT patchifies latents 1x2x2
TEMPORAL_STRIDE = 4  # Wan VAEs: 4n+1 frames <-> n+1 latent frames


@dataclass(frozen=True)
class BackboneSignature:
    """What an adapter depends on in a backbone; recorded in every adapter file and checked on load."""

    family: str  # "wan2.1" (16 latent channels, VAE stride 8) or "wan2.2" (48 channels, stride 16)
    dim: int
    num_layers: int
    num_heads: int
    latent_channels: int
    vae_stride: int
    text_dim: int = 4096
    patch_size: tuple = WAN_PATCH

    @property
    def grid_px(self):
        """Pixel multiple the DiT needs: one token covers vae_stride x patch pixels."""
        return self.vae_stride * self.patch_size[1]

    def describe(self):
        return (f"{self.family} DiT (dim {self.dim}, {self.num_layers} blocks, {self.num_heads} heads, "
                f"{self.latent_channels} latent channels, patch {'x'.join(map(str, self.patch_size))})")

    def to_json(self):
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text):
        fields = json.loads(text)
        fields["patch_size"] = tuple(fields["patch_size"])
        return cls(**fields)


def family_for_channels(latent_channels):
    return {16: ("wan2.1", 8), 48: ("wan2.2", 16)}.get(latent_channels)


# Published geometries (methods.md §2), used for shape checks and benchmarks without allocating weights.
WAN21_1_3B = BackboneSignature("wan2.1", dim=1536, num_layers=30, num_heads=12, latent_channels=16, vae_stride=8)
WAN21_14B = BackboneSignature("wan2.1", dim=5120, num_layers=40, num_heads=40, latent_channels=16, vae_stride=8)
WAN22_5B = BackboneSignature("wan2.2", dim=3072, num_layers=30, num_heads=24, latent_channels=48, vae_stride=16)
FFN_DIM = {WAN21_1_3B: 8960, WAN21_14B: 13824, WAN22_5B: 14336}


def frames_on_grid(frames, stride=TEMPORAL_STRIDE):
    """Smallest stride*k+1 frame count that holds `frames` (what the causal VAE encodes without loss)."""
    if frames < 1:
        raise ValueError("a video needs at least one frame")
    return ((frames - 1 + stride - 1) // stride) * stride + 1


def round_up(value, multiple):
    return -(-value // multiple) * multiple


TEXT_TOKENS = 512  # umt5 context length every Wan DiT was trained with
