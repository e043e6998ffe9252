"""The backbone registry: every fact about the supported Wan families and their published releases, in one table.

A `Family` is what an adapter depends on beyond the DiT's width and depth: how a loaded MODEL is recognised as
it, its latent channels, VAE stride and patch (so its pixel grid), the memory its VAE takes and the noise level
its DiT is shown carried frames at. A `Release` is one published checkpoint of a family: its width and depth, FFN
width and training resolution. Everything that needs such a fact reads it here: recognising a MODEL
(nodes/backbone.py), the streaming pipeline's context level (nodes/pipeline.py), default DiT tiles
(dit_tiling.py), the memory planner's VAE model and parameter counts (memory.py), the bench, the tiny stand-ins
(tools/tiny_models.py) and the front end's grid rule (js/litevsr_rules.js, checked against this table by
tests/test_registry.py).

Adding a Wan family is one `register(Family(...), Release(...), ...)` call plus its stand-in in
tools/tiny_models.py. ComfyUI classes are named here, never imported: the core stays free of ComfyUI.
"""
import math
from contextlib import contextmanager
from dataclasses import dataclass

from .geometry import TEXT_DIM, WAN_PATCH, BackboneSignature, token_px

FREQ_DIM = 256  # width of the sinusoidal timestep embedding every Wan DiT starts from


@dataclass(frozen=True)
class Recognition:
    """How a loaded MODEL is told to be of a family: the classes ComfyUI's stock loaders give it and its DiT's model
    type. Channel counts alone cannot tell families apart (a later 48-channel Wan would pass for Wan2.2)."""

    model_class: str  # class name in comfy.model_base
    latent_format: str  # class name in comfy.latent_formats
    model_type: str = "t2v"  # comfy.ldm.wan.model.WanModel.model_type


@dataclass(frozen=True)
class Family:
    id: str  # recorded in adapter files as BackboneSignature.family
    title: str  # how messages name the family
    recognition: Recognition
    latent_channels: int
    vae_stride: int  # spatial stride of the family's VAE
    # ComfyUI's own VAE memory estimates (comfy/sd.py, VAE.__init__) in bytes per dtype byte per output pixel of one
    # frame: what VAE.decode / VAE.encode ask load_models_gpu to free, so the planner reserves what ComfyUI will.
    vae_decode_per_px: int
    vae_encode_per_px: int
    patch: tuple = WAN_PATCH
    # The noise level the DiT is shown a chunk's known frames at (the previous chunk's finished latents), with that
    # level as their own timestep (core/sampling.py, KnownFrames); why each family's value: ARCHITECTURE.md, Sampling.
    context_sigma: float = 0.0

    @property
    def grid_px(self):
        return token_px(self.vae_stride, self.patch)

    def signature(self, dim, num_layers, num_heads, text_dim=TEXT_DIM):
        """The signature of a DiT of this family with the given width and depth."""
        return BackboneSignature(self.id, dim=dim, num_layers=num_layers, num_heads=num_heads,
                                 latent_channels=self.latent_channels, vae_stride=self.vae_stride, text_dim=text_dim,
                                 patch_size=self.patch)


@dataclass(frozen=True)
class Release:
    id: str  # the family id weights/models.json lists its files under
    signature: BackboneSignature
    ffn_dim: int
    training_px: tuple  # (width, height) the DiT was trained at

    @property
    def parameters(self):
        return dit_parameters(self.signature, self.ffn_dim)

    @property
    def stand_in_shape(self):
        """The release's shape as tools/tiny_models.tiny_wan_dit_state_dict takes it (random weights, real size)."""
        sig = self.signature
        return dict(family=sig.family, dim=sig.dim, num_layers=sig.num_layers, ffn_dim=self.ffn_dim)


def dit_parameters(signature: BackboneSignature, ffn_dim):
    """Parameters of a Wan T2V DiT (comfy/ldm/wan/model.py), exact (tested against built models), so callers can
    budget before anything is allocated."""
    d, f = signature.dim, ffn_dim
    patch = math.prod(signature.patch_size) * signature.latent_channels
    # self- and cross-attention (q, k, v, o with biases; q/k RMSNorms), affine norm3, FFN, 6-way modulation
    block = 2 * (4 * d * d + 4 * d + 2 * d) + 2 * d + (2 * d * f + f + d) + 6 * d
    # patch embedding, text and time MLPs, 6-way time projection
    embed = ((patch * d + d) + (signature.text_dim * d + d + d * d + d) + (FREQ_DIM * d + d + d * d + d)
             + (6 * d * d + 6 * d))
    head = d * patch + patch + 2 * d  # linear to the patch channels + its modulation
    return signature.num_layers * block + embed + head


_FAMILIES = {}
_RELEASES = {}


def register(family: Family, *releases: Release):
    """Adds a family and its releases. Refused: a taken id, a recognition another family has, a release of another
    family, and a VAE stride another family's VAE has with other facts (the memory planner names a VAE by its
    stride)."""
    if family.id in _FAMILIES:
        raise ValueError(f"backbone family {family.id!r} is already registered")
    for other in _FAMILIES.values():
        if other.recognition == family.recognition:
            raise ValueError(f"{family.id} would be recognised as {other.id} is: {family.recognition}")
        if other.vae_stride == family.vae_stride and _vae_facts(other) != _vae_facts(family):
            raise ValueError(f"{family.id}'s VAE has stride {family.vae_stride} like {other.id}'s but other facts")
    for release in releases:
        if release.signature.family != family.id or release.id in _RELEASES:
            raise ValueError(f"release {release.id!r} is taken or not of family {family.id}")
    _FAMILIES[family.id] = family
    _RELEASES.update((release.id, release) for release in releases)


def unregister(family_id):
    del _FAMILIES[family_id]
    for release in [r for r in _RELEASES.values() if r.signature.family == family_id]:
        del _RELEASES[release.id]


@contextmanager
def registered(family: Family, *releases: Release):
    """The family and its releases registered for the duration of a `with` block (tests, experiments)."""
    register(family, *releases)
    try:
        yield family
    finally:
        unregister(family.id)


def _vae_facts(family):
    return family.latent_channels, family.vae_decode_per_px, family.vae_encode_per_px


def families():
    return tuple(_FAMILIES.values())


def releases():
    return tuple(_RELEASES.values())


def family(family_id):
    if family_id not in _FAMILIES:
        raise ValueError(f"unknown backbone family {family_id!r}; known: {', '.join(_FAMILIES)}")
    return _FAMILIES[family_id]


def release(release_id):
    if release_id not in _RELEASES:
        raise ValueError(f"unknown Wan release {release_id!r}; known: {', '.join(_RELEASES)}")
    return _RELEASES[release_id]


def recognise(recognition: Recognition):
    """The family a loaded MODEL with these ComfyUI facts belongs to, or None."""
    return next((f for f in _FAMILIES.values() if f.recognition == recognition), None)


def release_of(signature: BackboneSignature):
    """The published release with exactly this signature, or None (tiny stand-ins, unknown checkpoints)."""
    return next((r for r in _RELEASES.values() if r.signature == signature), None)


def training_release(signature: BackboneSignature):
    """The release whose training resolution suits a DiT of this signature: the family's release of the same width;
    any other width (tiny stand-ins) gets the family's release trained at the fewest pixels, the safer tile."""
    candidates = [r for r in _RELEASES.values() if r.signature.family == signature.family]
    if not candidates:
        raise ValueError(f"no training resolution known for backbone family {signature.family!r}; "
                         "pass the DiT tile size explicitly")
    same_width = next((r for r in candidates if r.signature.dim == signature.dim), None)
    return same_width or min(candidates, key=lambda r: math.prod(r.training_px))


def vae_family(vae_stride):
    """The family whose VAE has this spatial stride (unique per VAE: `register` sees to it)."""
    found = next((f for f in _FAMILIES.values() if f.vae_stride == vae_stride), None)
    if found is None:
        strides = " or ".join(str(s) for s in sorted({f.vae_stride for f in _FAMILIES.values()}))
        raise ValueError(f"no memory model for a VAE with spatial stride {vae_stride}; Wan VAEs have {strides}")
    return found


# The published Wan families and releases (the configs in Wan-Video's Wan2.1 and Wan2.2 repositories). Wan2.1-1.3B
# was trained at 480p; Wan2.1-14B and Wan2.2-TI2V-5B up to 720p (TI2V-5B at 1280x704, a multiple of its 32 px grid).
# Context levels: Wan2.2 TI2V-5B was trained with clean first-frame tokens at timestep 0, so 0 is its own scheme;
# Wan2.1 T2V never saw per-frame timesteps: 0.02 (timestep 20) is the level SkyReels-V2's Wan2.1-based Diffusion
# Forcing gives the overlap frames of long videos.
WAN21 = Family("wan2.1", "Wan2.1 T2V (1.3B/14B)", Recognition("WAN21", "Wan21"), latent_channels=16, vae_stride=8,
               vae_decode_per_px=7000, vae_encode_per_px=6000, context_sigma=0.02)
WAN22 = Family("wan2.2", "Wan2.2 TI2V-5B", Recognition("WAN22", "Wan22"), latent_channels=48, vae_stride=16,
               vae_decode_per_px=8000, vae_encode_per_px=3300, context_sigma=0.0)
WAN21_1_3B = WAN21.signature(dim=1536, num_layers=30, num_heads=12)
WAN21_14B = WAN21.signature(dim=5120, num_layers=40, num_heads=40)
WAN22_5B = WAN22.signature(dim=3072, num_layers=30, num_heads=24)
register(WAN21, Release("wan2.1-t2v-1.3b", WAN21_1_3B, ffn_dim=8960, training_px=(832, 480)),
         Release("wan2.1-t2v-14b", WAN21_14B, ffn_dim=13824, training_px=(1280, 720)))
register(WAN22, Release("wan2.2-ti2v-5b", WAN22_5B, ffn_dim=14336, training_px=(1280, 704)))
