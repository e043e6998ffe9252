"""Wan backbone geometry: what an adapter depends on in a backbone, and the grids that follow from it. The facts of
each supported family and release (channels, strides, widths, training resolutions) live in `backbones.py`."""
import json
from dataclasses import asdict, dataclass

WAN_PATCH = (1, 2, 2)  # every Wan T2V DiT patchifies latents 1x2x2
TEMPORAL_STRIDE = 4  # Wan VAEs: 4n+1 frames <-> n+1 latent frames
TEXT_DIM = 4096  # umt5-xxl width every Wan DiT reads its text context at
INFVSR_CONTEXT_DIM = 512  # InfVSR's Wan2.1 DiT reads DAPE visual tokens (RAM's image_proj), not umt5, as context


@dataclass(frozen=True)
class BackboneSignature:
    """What an adapter depends on in a backbone; recorded in every adapter file and checked on load."""

    family: str  # a family id of the backbone registry (backbones.py)
    dim: int
    num_layers: int
    num_heads: int
    latent_channels: int
    vae_stride: int
    text_dim: int = TEXT_DIM
    patch_size: tuple = WAN_PATCH

    @property
    def grid_px(self):
        return token_px(self.vae_stride, self.patch_size)

    def width_height_px(self, latent_hw):
        """[width, height] in pixels of an (h, w) size in latents, the order the front end shows sizes in."""
        return [latent_hw[1] * self.vae_stride, latent_hw[0] * self.vae_stride]

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


def token_px(vae_stride, patch_size):
    """Pixel multiple a DiT needs: one token covers vae_stride x patch pixels."""
    return vae_stride * patch_size[1]


def frames_on_grid(frames, stride=TEMPORAL_STRIDE):
    """Smallest stride*k+1 frame count that holds `frames` (what the causal VAE encodes without loss)."""
    if frames < 1:
        raise ValueError("a video needs at least one frame")
    return ((frames - 1 + stride - 1) // stride) * stride + 1


def round_up(value, multiple):
    return -(-value // multiple) * multiple


TEXT_TOKENS = 512  # umt5 context length every Wan DiT was trained with
