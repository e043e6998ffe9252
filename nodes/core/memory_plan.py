"""The memory plan: the largest chunk and tile sizes whose estimates fit the memory available.

Users' top complaint about video-SR packs is running out of memory with no idea which settings work (the most
reported problem in the issue trackers of the SeedVR2, FlashVSR and WanVideoWrapper packs). `plan` turns the output
size, the frame count and the memory available into the three sizes the pipeline needs, before anything is
allocated, and `Plan.describe` says what it chose:

  chunk_frames  frames per temporal chunk, on the 4n+1 grid of the causal VAE (temporal.py)
  dit_tile      (height, width) of a spatial DiT tile in LATENT units, multiples of the patch (2), <= the latent
  decode_tile   side of a square spatial VAE tile in output PIXELS, a multiple of the VAE stride (decode.py)

A "plan" in this module, in oom.py and in nodes/planner.py is always this: the three sizes chosen for a run with
their estimates (`Plan`). The budgets come from the caller: the node passes ComfyUI's
`model_management.get_free_memory(device)` (after the models are loaded, so the device budget is what the
activations of one stage may use) and `host_memory.host_available_bytes()`. The estimates are memory.py's.

Imports nothing of ComfyUI.
"""
from dataclasses import dataclass, field, replace

from .dit_tiling import training_tile
from .geometry import TEMPORAL_STRIDE, BackboneSignature, frames_on_grid, round_up
from .memory import (GiB, MiB, chunk_host_bytes, decode_bytes, dit_step_bytes, encode_bytes, latent_state_bytes,
                     output_host_bytes)


MAX_AUTO_CHUNK_FRAMES = 81  # Wan's native clip length; longer auto chunks leave the regime the DiT was trained in
MIN_CHUNK_FRAMES = TEMPORAL_STRIDE + 1  # 5: one anchor latent plus one latent group
# An untiled DiT is preferred over longer chunks only while the chunk can stay at least this long (or the whole
# video): below it, every chunk boundary (a cross-fade, a re-encoded anchor frame) costs more than tile seams, and
# with a temporal overlap the chunk stride (chunk - 1 - overlap) collapses to a few frames.
PREFERRED_MIN_CHUNK_FRAMES = 33
MIN_DIT_TILE = 16  # latents: one 8 x 8-token adapter window
MIN_DECODE_TILE_PX = 128  # ComfyUI's own OOM fallback is 256 px; below 128 px the 64 px overlap dominates
DEFAULT_RESERVE_BYTES = 256 * MiB  # cuBLAS/cuDNN workspaces and allocator slack outside any estimate
STAGES = ("dit", "decode", "encode", "chunk")
# Which requested sizes each stage's estimate depends on.
STAGE_SIZES = {"dit": ("chunk_frames", "dit_tile"), "decode": ("decode_tile", "chunk_frames"),
               "encode": ("decode_tile", "chunk_frames"), "chunk": ("chunk_frames",)}
STAGE_LABEL = {"dit": "DiT step", "decode": "VAE decode", "encode": "VAE encode", "chunk": "host RAM per chunk"}


def format_bytes(num_bytes):
    if num_bytes >= GiB:
        return f"{num_bytes / GiB:.2f} GiB"
    return f"{num_bytes / MiB:.0f} MiB"


@dataclass(frozen=True)
class PlanOptions:
    """How a run executes, apart from the three sizes: what the estimates and the search depend on."""

    dtype_bytes: int = 2  # DiT activations
    vae_dtype_bytes: int = 2
    batch: int = 1
    shared_blocks: bool = False  # the adapter's condition branch: every DiT block sees a doubled batch
    overlap_frames: int = 0  # frames a chunk shares with the previous one, a multiple of 4
    stream_output: bool = False  # frames go to a file: no whole-video IMAGE on the host
    reserve_bytes: int = DEFAULT_RESERVE_BYTES  # kept back from the device budget
    max_chunk_frames: int = MAX_AUTO_CHUNK_FRAMES
    # Further keywords of memory.dit_step_bytes (ffn_dim, adapter_width, adapter_dtype_bytes, adapter_window,
    # adapter_mlp_ratio), passed through so their defaults stay in one place.
    dit_options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    """Sizes chosen for a run and their estimates. Build with `plan(...)`; `with_sizes` re-estimates."""

    signature: BackboneSignature
    out_h: int
    out_w: int
    num_frames: int
    budget_bytes: int  # device memory one stage may use (reserve already subtracted)
    host_budget_bytes: int
    chunk_frames: int
    dit_tile: tuple  # (h, w) latents
    decode_tile: int  # px
    dit_bytes: int = 0  # one DiT call on a tile + the chunk's latent state
    decode_bytes: int = 0
    encode_bytes: int = 0
    host_bytes: int = 0
    auto: tuple = ()  # which of "chunk_frames", "dit_tile", "decode_tile" were chosen automatically
    warnings: tuple = ()
    options: PlanOptions = field(default_factory=PlanOptions, compare=False)

    @property
    def grid_px(self):
        return self.signature.grid_px

    @property
    def latent_hw(self):
        """Latent size of the grid-padded output frame."""
        stride = self.signature.vae_stride
        return round_up(self.out_h, self.grid_px) // stride, round_up(self.out_w, self.grid_px) // stride

    @property
    def latent_frames(self):
        return (self.chunk_frames - 1) // TEMPORAL_STRIDE + 1

    @property
    def dit_tiled(self):
        return tuple(self.dit_tile) != self.latent_hw

    @property
    def decode_tiled(self):
        lat_h, lat_w = self.latent_hw
        stride = self.signature.vae_stride
        return self.decode_tile < max(lat_h, lat_w) * stride

    @property
    def decode_tile_hw_px(self):
        """(h, w) px one decode tile actually covers (a tile never exceeds the frame)."""
        lat_h, lat_w = self.latent_hw
        stride = self.signature.vae_stride
        return min(self.decode_tile, lat_h * stride), min(self.decode_tile, lat_w * stride)

    def with_sizes(self, **sizes):
        """The same plan with some of chunk_frames / dit_tile / decode_tile replaced, estimates recomputed."""
        return _estimate(replace(self, **sizes))

    def fits(self):
        """Every stage's estimate within its budget."""
        return all(used <= budget for _, used, budget in self._stage_usage())

    def _stage_usage(self):
        return [("dit", self.dit_bytes, self.budget_bytes), ("decode", self.decode_bytes, self.budget_bytes),
                ("encode", self.encode_bytes, self.budget_bytes), ("chunk", self.host_bytes, self.host_budget_bytes)]

    def describe(self):
        """One line: the settings actually used and the estimates against the budgets."""
        def tag(name):
            return " (auto)" if name in self.auto else ""

        lat_h, lat_w = self.latent_hw
        chunks = "one chunk" if self.chunk_frames >= frames_on_grid(self.num_frames) else \
            f"chunks of {self.chunk_frames} frames"
        stride = self.signature.vae_stride
        dit = (f"DiT tiles {self.dit_tile[1] * stride}x{self.dit_tile[0] * stride} px "
               f"({self.dit_tile[0]}x{self.dit_tile[1]} latents)"
               if self.dit_tiled else f"DiT untiled ({lat_h}x{lat_w} latents)")
        decode = f"VAE tiles {self.decode_tile} px" if self.decode_tiled else "VAE untiled"
        line = (f"LiteVSR memory plan: {self.out_w}x{self.out_h}, {self.num_frames} frames in {chunks}"
                f"{tag('chunk_frames')}; {dit}{tag('dit_tile')}; {decode}{tag('decode_tile')} | estimates: "
                f"DiT {format_bytes(self.dit_bytes)}, decode {format_bytes(self.decode_bytes)}, "
                f"encode {format_bytes(self.encode_bytes)} of {format_bytes(self.budget_bytes)} device; "
                f"host {format_bytes(self.host_bytes)} of {format_bytes(self.host_budget_bytes)} RAM")
        if self.warnings:
            line += " | WARNING: " + "; ".join(self.warnings)
        return line


def _estimate(p: Plan) -> Plan:
    o = p.options
    sig = p.signature
    lat_h, lat_w = p.latent_hw
    latent_frames = (p.chunk_frames - 1) // TEMPORAL_STRIDE + 1
    tile_h, tile_w = p.dit_tile
    dit = dit_step_bytes(sig, latent_frames, tile_h, tile_w, o.dtype_bytes, o.batch, o.shared_blocks,
                         **o.dit_options)
    dit += latent_state_bytes(sig, latent_frames, lat_h, lat_w, o.batch)
    tile_px_h = min(p.decode_tile, lat_h * sig.vae_stride)
    tile_px_w = min(p.decode_tile, lat_w * sig.vae_stride)
    decode = decode_bytes(sig.vae_stride, tile_px_h // sig.vae_stride, tile_px_w // sig.vae_stride,
                          o.vae_dtype_bytes, out_frames=p.chunk_frames)
    encode = encode_bytes(sig.vae_stride, tile_px_h, tile_px_w, o.vae_dtype_bytes, frames=p.chunk_frames)
    host = chunk_host_bytes(p.chunk_frames, lat_h * sig.vae_stride, lat_w * sig.vae_stride)
    if not o.stream_output:
        host += output_host_bytes(p.num_frames, p.out_h, p.out_w)
    return replace(p, dit_bytes=dit, decode_bytes=decode, encode_bytes=encode, host_bytes=host)


def round_down(value, multiple):
    return value // multiple * multiple


def chunk_candidates(num_frames, min_frames=MIN_CHUNK_FRAMES, max_frames=MAX_AUTO_CHUNK_FRAMES):
    """4n+1 chunk lengths, longest first: from min(the whole video, max_frames) down to min_frames."""
    top = min(frames_on_grid(num_frames), round_down(max(max_frames, MIN_CHUNK_FRAMES) - 1, TEMPORAL_STRIDE) + 1)
    bottom = min(top, min_frames)
    return list(range(top, bottom - 1, -TEMPORAL_STRIDE))


def dit_tile_candidates(signature: BackboneSignature, latent_h, latent_w, multiple=2, min_tile=MIN_DIT_TILE):
    """DiT tiles (h, w) in latents, largest first: the whole latent, then tiles no larger than the training
    resolution (turned to the latent's orientation), shrinking the long side by `multiple` at a time and the short
    side in proportion, down to `min_tile` (or the latent, if smaller). All aligned to `multiple`."""
    whole = (latent_h, latent_w)
    train_h, train_w = training_tile(signature)
    if latent_h > latent_w:
        train_h, train_w = train_w, train_h
    start_h = min(latent_h, round_down(train_h, multiple))
    start_w = min(latent_w, round_down(train_w, multiple))
    floor_h, floor_w = min(latent_h, min_tile), min(latent_w, min_tile)
    candidates = [whole]
    long_is_h = start_h >= start_w
    long_start, short_start = (start_h, start_w) if long_is_h else (start_w, start_h)
    long_floor, short_floor = (floor_h, floor_w) if long_is_h else (floor_w, floor_h)
    for long_side in range(long_start, long_floor - 1, -multiple):
        short_side = max(short_floor, min(short_start, round_down(short_start * long_side // long_start,
                                                                   multiple)))
        tile = (long_side, short_side) if long_is_h else (short_side, long_side)
        if tile != candidates[-1]:
            candidates.append(tile)
    return candidates


def decode_tile_candidates(latent_h, latent_w, vae_stride, min_px=MIN_DECODE_TILE_PX):
    """Square decode tiles in px, largest first: the whole frame (its longer side), then every multiple of the
    VAE stride below it down to min_px."""
    whole = max(latent_h, latent_w) * vae_stride
    bottom = min(whole, round_up(min_px, vae_stride))
    return list(range(whole, bottom - 1, -vae_stride))


def _requested(requested, name):
    value = (requested or {}).get(name, "auto")
    if value is None or (isinstance(value, str) and value.lower() == "auto") or value == 0:
        return "auto"
    return value


def plan(signature: BackboneSignature, out_h, out_w, num_frames, budget_bytes, host_budget_bytes, requested=None,
         options=PlanOptions()) -> Plan:
    """Choose chunk_frames, dit_tile and decode_tile for an `out_h x out_w` x `num_frames` output.

    `requested`: {"chunk_frames", "dit_tile", "decode_tile"}, each an int (dit_tile also an (h, w) pair, in
    latents) or "auto" (missing keys, None and 0 mean auto). Explicit values are validated and honoured; if their
    estimate exceeds a budget the plan carries a warning instead of refusing (the user asked for it).
    `budget_bytes`: device memory free for one stage's working set (ComfyUI's get_free_memory after the models
    are loaded); `options.reserve_bytes` is kept back from it. `host_budget_bytes`: RAM available
    (host_memory.host_available_bytes). `options`: how the run executes (PlanOptions).

    Auto choice, largest sizes that fit, in this order of preference:
      1. a frame no larger than the backbone's training resolution runs untiled in the DiT: the DiT tile is
         maximised first (against a 33-frame chunk, PREFERRED_MIN_CHUNK_FRAMES, or the shortest chunk when even
         the smallest tile needs it), then the chunk;
         a frame above the training resolution gains nothing from being untiled, so the chunk is maximised first
         (against the smallest tile), then the tile (the whole frame again if it still fits).
      2. the decode tile: the largest that fits with the chosen chunk.
    Chunks are at most `options.max_chunk_frames` (81, Wan's clip length) and at least 5 + `overlap_frames`.
    Raises ValueError, before anything is allocated, when even the smallest sizes cannot fit, naming the stage
    and its smallest estimate.
    """
    if num_frames < 1 or out_h < 1 or out_w < 1:
        raise ValueError(f"nothing to plan: {out_w}x{out_h} px, {num_frames} frames")
    overlap_frames = options.overlap_frames
    if overlap_frames < 0 or overlap_frames % TEMPORAL_STRIDE:
        raise ValueError(f"overlap_frames must be a multiple of {TEMPORAL_STRIDE}, got {overlap_frames}")
    sig = signature
    multiple = sig.patch_size[1]
    device_budget = max(0, int(budget_bytes) - int(options.reserve_bytes))
    base = Plan(sig, out_h, out_w, num_frames, device_budget, int(host_budget_bytes), chunk_frames=MIN_CHUNK_FRAMES,
                dit_tile=(0, 0), decode_tile=0, options=options)
    lat_h, lat_w = base.latent_hw
    min_chunk = MIN_CHUNK_FRAMES + overlap_frames

    # Candidate lists, largest first; an explicit request is a list of one.
    want_chunk, want_tile, want_decode = (_requested(requested, name)
                                          for name in ("chunk_frames", "dit_tile", "decode_tile"))
    if want_chunk == "auto":
        chunks = chunk_candidates(num_frames, min_chunk, options.max_chunk_frames)
    else:
        chunks = [check_chunk(want_chunk, num_frames, overlap_frames)]
    if want_tile == "auto":
        tiles = dit_tile_candidates(sig, lat_h, lat_w, multiple)
    else:
        tiles = [check_dit_tile(want_tile, lat_h, lat_w, multiple)]
    if want_decode == "auto":
        decodes = decode_tile_candidates(lat_h, lat_w, sig.vae_stride)
    else:
        decodes = [check_decode_tile(want_decode, lat_h, lat_w, sig.vae_stride)]
    auto = tuple(name for name, want in (("chunk_frames", want_chunk), ("dit_tile", want_tile),
                                         ("decode_tile", want_decode)) if want == "auto")

    def make(chunk, tile, decode):
        return _estimate(replace(base, chunk_frames=chunk, dit_tile=tuple(tile), decode_tile=decode, auto=auto))

    def chunk_ok(p):  # the stages that depend on chunk and DiT tile; the decode tile at its smallest
        return p.dit_bytes <= device_budget and p.host_bytes <= host_budget_bytes and \
            p.decode_bytes <= device_budget and p.encode_bytes <= device_budget

    smallest_decode = decodes[-1]
    train_h, train_w = training_tile(sig)
    within_training = lat_h * lat_w <= train_h * train_w
    if within_training:  # tile first (against a chunk of PREFERRED_MIN_CHUNK_FRAMES, else the shortest), then chunk
        tile = None
        for floor in dict.fromkeys((min(chunks[0], max(chunks[-1], PREFERRED_MIN_CHUNK_FRAMES)), chunks[-1])):
            tile = next((t for t in tiles if chunk_ok(make(floor, t, smallest_decode))), None)
            if tile is not None:
                break
        chunk = None if tile is None else next(c for c in chunks if chunk_ok(make(c, tile, smallest_decode)))
    else:  # chunk first (against the smallest tile), then the tile
        chunk = next((c for c in chunks if chunk_ok(make(c, tiles[-1], smallest_decode))), None)
        tile = None if chunk is None else next(t for t in tiles if chunk_ok(make(chunk, t, smallest_decode)))
    if tile is None or chunk is None:
        smallest = make(chunks[-1], tiles[-1], smallest_decode)
        _refuse_or_warn(smallest, auto, device_budget)
        chunk, tile = chunks[-1], tiles[-1]
    decode = next((d for d in decodes if make(chunk, tile, d).decode_bytes <= device_budget and
                   make(chunk, tile, d).encode_bytes <= device_budget), decodes[-1])
    chosen = make(chunk, tile, decode)
    return replace(chosen, warnings=budget_warnings(chosen))


def _over_budget(p: Plan):
    return [(stage, used, budget) for stage, used, budget in p._stage_usage() if used > budget]


def _refuse_or_warn(smallest: Plan, auto, device_budget):
    """Refuse when a stage whose sizes are all automatic cannot fit even at the smallest sizes."""
    for stage, used, budget in _over_budget(smallest):
        if all(size in auto for size in STAGE_SIZES[stage]):
            if stage == "chunk":
                where, advice = "RAM", "close other programs, or lower the output size or the frame count"
                if not smallest.options.stream_output:
                    advice += ", or stream the output to a file instead of returning all frames"
            else:
                where, advice = "device memory", ("free VRAM (unload other models, start ComfyUI with --lowvram), "
                                                  "or lower the output size")
            raise ValueError(
                f"LiteVSR cannot fit {smallest.out_w}x{smallest.out_h} px x {smallest.num_frames} frames in the "
                f"memory available: even the smallest settings (chunk {smallest.chunk_frames} frames, DiT tile "
                f"{smallest.dit_tile[0]}x{smallest.dit_tile[1]} latents, VAE tile {smallest.decode_tile} px) need "
                f"{format_bytes(used)} for the {STAGE_LABEL[stage]}, but only {format_bytes(budget)} of {where} is "
                f"free"
                + ("" if stage == "chunk" else
                   f" (after keeping {format_bytes(smallest.options.reserve_bytes)} for workspaces)")
                + ". To fix: "
                f"{advice}. Nothing was allocated.")


def budget_warnings(p: Plan):
    """One warning per stage over its budget (explicit sizes are honoured, not refused)."""
    return tuple(f"{STAGE_LABEL[stage]} estimate {format_bytes(used)} exceeds the {format_bytes(budget)} available "
                 f"with the requested sizes; set them to auto or lower them" for stage, used, budget in _over_budget(p))


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def check_chunk(value, num_frames, overlap_frames):
    """A requested chunk length: 4n+1 frames, longer than the overlap; clamped to the (grid-padded) video."""
    if not _is_int(value) or value < MIN_CHUNK_FRAMES or (value - 1) % TEMPORAL_STRIDE:
        low = max(MIN_CHUNK_FRAMES, round_down(int(value) - 1, TEMPORAL_STRIDE) + 1) if _is_int(value) else 33
        raise ValueError(f"chunk_frames must be 4n+1 (5, 9, ..., 33, 81) or 'auto', got {value!r}; "
                         f"use {low} or {low + TEMPORAL_STRIDE}")
    if value - 1 - overlap_frames < TEMPORAL_STRIDE:
        raise ValueError(f"chunk_frames {value} leaves no new frames with an overlap of {overlap_frames}")
    return min(value, max(frames_on_grid(num_frames), MIN_CHUNK_FRAMES))


def check_dit_tile(value, lat_h, lat_w, multiple):
    """A requested DiT tile (an int or an (h, w) pair, latents, multiples of the patch), clamped to the latent."""
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or not all(_is_int(v) and v >= multiple and v % multiple == 0 for v in pair):
        raise ValueError(f"dit_tile must be 'auto', or an int or (height, width) pair of positive multiples of "
                         f"{multiple} in latent units, got {value!r}")
    return min(pair[0], lat_h), min(pair[1], lat_w)


def check_decode_tile(value, lat_h, lat_w, stride):
    """A requested decode tile side (px, a multiple of the VAE stride), clamped to the frame's longer side."""
    if not _is_int(value) or value < stride or value % stride:
        raise ValueError(f"decode_tile must be 'auto' or a positive multiple of the VAE stride ({stride} px), "
                         f"got {value!r}")
    return min(value, max(lat_h, lat_w) * stride)

