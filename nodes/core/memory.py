"""Memory planner: estimates, an automatic choice of chunk/tile sizes, and out-of-memory back-off.

Users' top complaint about video-SR packs is running out of memory with no idea which settings work (peers.md §3,
items 1, 2 and 12). This module turns the output size, the frame count and the memory available into the three
sizes the pipeline needs, before anything is allocated, and prints what it chose:

  chunk_frames  frames per temporal chunk, on the 4n+1 grid of the causal VAE (temporal.py)
  dit_tile      (height, width) of a spatial DiT tile in LATENT units, multiples of the patch (2), <= the latent
  decode_tile   side of a square spatial VAE tile in output PIXELS, a multiple of the VAE stride (decode.py)

Every estimate is a pure function of shapes (no allocation, no device query) and returns bytes. The budgets come
from the caller: the node passes ComfyUI's `model_management.get_free_memory(device)` (after the models are
loaded, so the device budget is what the activations of one stage may use) and `host_available_bytes()`.

Stages are estimated separately because they run one after the other: ComfyUI may offload the DiT to make room
for the VAE (`VAE.decode` asks `load_models_gpu` for its own estimate), so each stage must fit on its own.

Pure python/torch; imports nothing of ComfyUI.
"""
import gc
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch

from .dit_tiling import training_tile
from .geometry import FFN_DIM, TEMPORAL_STRIDE, TEXT_TOKENS, BackboneSignature, frames_on_grid, round_up

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
FP32 = 4

# ---------------------------------------------------------------------------------------------------------------
# DiT forward
# ---------------------------------------------------------------------------------------------------------------

# Safety factor on the modelled live-tensor peak of a DiT forward. Covers what the model below leaves out:
# the caching allocator's rounding and fragmentation (PyTorch rounds blocks > 1 MiB to 2 MiB and cannot always
# reuse a freed block for a slightly larger request; 10-20 % is typical), the time-modulation tensors, LayerNorm
# and RMSNorm statistics, SDPA's log-sum-exp and workspace (O(L * heads), not O(L^2)), and kernels that
# materialise a transposed copy. Calibrated by tests/test_memory.py against a real ComfyUI WanModel forward with
# the adapter attached through the pack's wrapper and block patches: the unscaled model is 1.00-1.05x the measured
# peak RSS increase (CPU, float32, 2k-8k tokens, direct and shared_blocks) and 1.03x a bfloat16 live-tensor trace,
# so with 1.25 the estimates are 1.25-1.31x the measurement: a margin for the GPU allocator, not a guess.
DIT_SAFETY = 1.25

# Element counts per token, in units of the DiT width `dim` (d), of the live tensors at each phase of one
# WanAttentionBlock forward under inference_mode (comfy/ldm/wan/model.py), INCLUDING the block input x, which the
# caller (forward_orig's loop variable and the patch's args dict) keeps alive for the whole block:
#   self-attention: x_in, modulated input h, q, k, v, SDPA output, its (b, L, heads*hd) reshape   -> 7 d
#                   (PyTorch's memory-efficient/flash SDPA keeps no L x L matrix: O(L) per head)
#   RoPE on k:      x_in, h, q, k linear out, k normed, plus apply_rope1's float32 copies of k: the upcast input
#                   (none when the activations are float32 already) and the rotated output
#   FFN:            x_in, current x, modulated input, hidden (ffn), GELU output (ffn)             -> 3 d + 2 ffn
#   direct inject:  x_in, block output, projection (adapter dtype), its cast, the sum             -> ~5 d
# The cross-attention against the 512 text tokens peaks lower (x_in, x, norm3(x), q, out, reshape: 6 d).
ATTENTION_UNITS = 7
ROPE_BASE_UNITS = 5  # x_in, h, q, k linear out, k normed
FFN_BASE_UNITS = 3  # x_in, current x, FFN input
INJECT_UNITS = 4  # x_in, block output, cast projection, sum (+ the projection in the adapter's dtype)

# The adapter's features pass (adapter.py `StateAwareAdapter.features`) runs once per model call, before the DiT
# blocks. Live tensors per token in units of the adapter width w, at its peak, the MLP of a WindowCrossAttention
# layer (traced op by op): structure and refinement embeddings (2), the key windows of both streams (2), the
# queries entering the layer (1, held by the caller), and the layer's locals, which stay alive until it returns:
# q (1), the fused k/v projection (4), the SDPA output (1), the attention residual (1), the MLP input (1); then
# the MLP hidden and its GELU (2 x mlp_ratio): 13 + 2 x mlp_ratio = 17 for the default ratio 2. The attention
# point before it peaks at 14. Windows pad the token grid to whole windows (1 x 8 x 8 tokens by default).
ADAPTER_ATTENTION_UNITS = 14
ADAPTER_MLP_BASE_UNITS = 13

# Latent tensors of the tile kept in float32 around a DiT call: x, noise, LR latent, estimate (crops), the
# patch-embedding input upcast, x0 output, unpatchify / blend temporaries.
LATENT_COPIES_PER_CALL = 8
# Sampler state over the WHOLE latent of a chunk (not the tile): x, noise, LR latent, estimate, x0 and the DiT
# tiler's blend accumulator, float32.
LATENT_STATE_COPIES = 6

DEFAULT_ADAPTER_WINDOW = (1, 8, 8)


def ffn_dim_of(signature: BackboneSignature):
    """FFN width of a known backbone; for unknown widths (tiny stand-ins) 6 x dim, above every published ratio
    (1.3B: 5.83, 14B: 2.7, 5B: 4.67), so the estimate stays an upper bound. Pass `ffn_dim` when known."""
    return FFN_DIM.get(signature) or 6 * signature.dim


def dit_tokens(signature: BackboneSignature, latent_frames, latent_h, latent_w):
    """Token count L = T * ceil(h / 2) * ceil(w / 2): the DiT pads the latent to whole 1x2x2 patches."""
    pt, ph, pw = signature.patch_size
    return -(-latent_frames // pt) * -(-latent_h // ph) * -(-latent_w // pw)


def dit_weight_bytes(signature: BackboneSignature, dtype_bytes, ffn_dim=None):
    """Parameter bytes of a Wan T2V DiT (for callers that budget before loading): per block 4 d^2 + 4 d^2
    (self and cross attention) + 2 d ffn + norms and modulation; plus text/time embeddings and the head.
    Wan2.1-1.3B: 1.42 G parameters."""
    d, f = signature.dim, ffn_dim or ffn_dim_of(signature)
    block = 8 * d * d + 8 * d + 4 * d + 2 * d * f + f + d + 2 * d + 6 * d
    patch = math.prod(signature.patch_size) * signature.latent_channels
    embeddings = (signature.text_dim * d + d * d + 2 * d) + (256 * d + d * d + 2 * d) + (d * 6 * d + 6 * d)
    head = d * patch + patch + 2 * d  # linear to the patch channels + its modulation
    params = signature.num_layers * block + embeddings + head + patch * d + d  # + the Conv3d patch embedding
    return params * dtype_bytes


def dit_step_breakdown(signature: BackboneSignature, latent_frames, latent_h, latent_w, dtype_bytes, batch=1,
                       shared_blocks=False, *, ffn_dim=None, adapter_width=None, adapter_dtype_bytes=FP32,
                       adapter_window=DEFAULT_ADAPTER_WINDOW, adapter_mlp_ratio=2):
    """Modelled live bytes (no safety factor) of one DiT forward, by phase. See `dit_step_bytes`."""
    d, f = signature.dim, ffn_dim or ffn_dim_of(signature)
    head_dim = d // signature.num_heads
    w = adapter_width or d
    db, ab = dtype_bytes, adapter_dtype_bytes
    tokens = dit_tokens(signature, latent_frames, latent_h, latent_w)
    rows = tokens * batch

    # One block, bytes per token per batch row (the block input included).
    rope_copies = 1 if db >= FP32 else 2 * FP32 / db  # float32 upcast + rotated output, in activation units
    per_row = max(ATTENTION_UNITS, ROPE_BASE_UNITS + rope_copies, FFN_BASE_UNITS + 2 * f / d) * d * db
    inject = INJECT_UNITS * d * db + d * ab
    if shared_blocks:
        # BlockPatch runs the frozen block on cat([x, condition]): the block sees two rows per token; x and the
        # condition tokens stay alive beside the concatenated batch; the injection reads the condition half.
        per_row_block = 2 * per_row + 2 * d * db + d * ab
        features = w * ab + d * db  # adapter features + the condition_in projection (first block)
    else:
        per_row_block = max(per_row, inject)
        features = w * ab
    rope = tokens * 2 * head_dim * FP32  # RoPE table [1, L, 1, hd/2, 2, 2] float32, shared by the batch
    context = batch * TEXT_TOKENS * signature.text_dim * db  # the text context input, alive throughout
    blocks = rows * (per_row_block + features) + rope + batch * TEXT_TOKENS * 3 * d * db  # + embedded, k, v

    # Adapter features pass, on the window-padded token grid.
    pt, ph, pw = signature.patch_size
    grid = (-(-latent_frames // pt), -(-latent_h // ph), -(-latent_w // pw))
    padded_tokens = math.prod(round_up(size, win) for size, win in zip(grid, adapter_window))
    adapter_units = max(ADAPTER_ATTENTION_UNITS, ADAPTER_MLP_BASE_UNITS + 2 * adapter_mlp_ratio)
    adapter = padded_tokens * batch * adapter_units * w * ab

    patch_elems = math.prod(signature.patch_size) * signature.latent_channels
    latents = rows * patch_elems * FP32 * LATENT_COPIES_PER_CALL
    return {"tokens": tokens, "blocks": blocks, "adapter": adapter, "latents": latents, "context": context,
            "peak": max(blocks, adapter) + latents + context}


def dit_step_bytes(signature: BackboneSignature, latent_frames, latent_h, latent_w, dtype_bytes, batch=1,
                   shared_blocks=False, *, safety=DIT_SAFETY, **options):
    """Peak activation bytes of one DiT forward (inference, adapter attached) on a latent of T x h x w.

    With L = T * (h/2) * (w/2) tokens, d = dim, f = ffn, w = adapter width, hd = head dim, and db/ab the
    activation/adapter dtype sizes (bytes):

      blocks  = L * batch * (max(7 d, (5 + rope) d, 3 d + 2 f) * db + w * ab)   one block's peak + features
              + L * 8 hd                                                       float32 RoPE table
              + batch * 512 * 3 d * db                                         embedded text, cross-attn k/v
      adapter = L_win * batch * max(14, 13 + 2 mlp_ratio) * w * ab              features pass (before blocks)
      peak    = safety * (max(blocks, adapter)
                          + L * batch * 4 C * 4 B * 8                          float32 latent crops
                          + batch * 512 * text_dim * db)                        text context input

    Attention is PyTorch SDPA (memory-efficient / flash), so nothing is O(L^2): the estimate is linear in L.
    `shared_blocks=True` runs every block on a doubled batch (the adapter's condition branch): ~2x the block term.
    `options`: ffn_dim (default from FFN_DIM), adapter_width (dim), adapter_dtype_bytes (4: adapters run in
    float32 unless cast), adapter_window ((1, 8, 8)), adapter_mlp_ratio (2). Weights are not included
    (`dit_weight_bytes`). Wan2.2 with a per-frame denoise mask would add per-token modulation; LiteVSR's sampler
    passes one timestep per sample, so it is not modelled.
    """
    parts = dit_step_breakdown(signature, latent_frames, latent_h, latent_w, dtype_bytes, batch, shared_blocks,
                               **options)
    return int(math.ceil(safety * parts["peak"]))


def dit_step_flops(signature: BackboneSignature, latent_frames, latent_h, latent_w, batch=1, adapter_mode=None, *,
                   ffn_dim=None, adapter_width=None, adapter_depth=2, adapter_rank=0,
                   adapter_window=DEFAULT_ADAPTER_WINDOW, adapter_mlp_ratio=2):
    """Matrix-product FLOPs (2 per multiply-add: linears, convolutions, attention scores and values) of one DiT
    forward on a latent of T x h x w; elementwise ops, norms and activations are left out (they are not what a
    matmul peak measures). `adapter_mode`: None (bare DiT), "direct" or "shared_blocks".

    With L tokens, R = batch * L rows, d = dim, f = ffn, t = 512 text tokens:
      block   = R (8 d^2 + 4 d^2 + 4 d f)       self-attention q/k/v/o, cross-attention q/o, FFN
              + batch (4 L^2 d + 4 L t d)       self- and cross-attention scores and values
              + batch 4 t d^2                   cross-attention k/v of the text context
      outside = patch embedding, head, time and text embeddings (once per call)
    The adapter adds its features pass (two patch embeddings; per layer q, fused k/v over both streams, out, MLP
    and windowed attention, on the window-padded grid) and one injection per block; shared_blocks runs every
    block on a doubled batch (x and the condition tokens, the text context twice) plus the condition_in projection.
    Checked against torch's FlopCounterMode on a real ComfyUI WanModel (tests/test_bench.py)."""
    d, f = signature.dim, ffn_dim or ffn_dim_of(signature)
    t, text_dim = TEXT_TOKENS, signature.text_dim
    patch = math.prod(signature.patch_size) * signature.latent_channels
    tokens = dit_tokens(signature, latent_frames, latent_h, latent_w)

    def block(batch_rows):  # one WanAttentionBlock on `batch_rows` samples
        rows = batch_rows * tokens
        return (rows * (12 * d * d + 4 * d * f) + batch_rows * (4 * tokens * tokens * d + 4 * tokens * t * d)
                + batch_rows * 4 * t * d * d)

    outside = (2 * batch * tokens * patch * d * 2  # patch embedding and head
               + 2 * batch * (256 * d + d * d + 6 * d * d)  # time embedding and its 6-way projection
               + 2 * batch * t * (text_dim * d + d * d))  # text embedding
    if adapter_mode is None:
        return outside + signature.num_layers * block(batch)

    w = adapter_width or d
    pt, ph, pw = signature.patch_size
    grid = (-(-latent_frames // pt), -(-latent_h // ph), -(-latent_w // pw))
    queries = batch * math.prod(round_up(size, win) for size, win in zip(grid, adapter_window))
    keys_per_window = 2 * math.prod(adapter_window)  # structure and refinement streams
    layer = queries * w * w * (2 + 8 + 2 + 4 * adapter_mlp_ratio) + 4 * queries * keys_per_window * w
    features = (2 * 2 * batch * tokens * patch * w  # structure and refinement patch embeddings
                + 2 * batch * (256 * w + 2 * w * w)  # time modulation
                + adapter_depth * layer)
    shared = adapter_mode == "shared_blocks"
    source = d if shared else w  # shared_blocks injects from the condition tokens, direct from the features
    inject = 2 * batch * tokens * (adapter_rank * (source + d) if adapter_rank else source * d)
    condition_in = 2 * batch * tokens * w * d if shared else 0
    blocks = signature.num_layers * (block(2 * batch if shared else batch) + inject)
    return outside + features + condition_in + blocks


def latent_state_bytes(signature: BackboneSignature, latent_frames, latent_h, latent_w, batch=1):
    """Sampler state kept on the device over the whole (untiled) latent of a chunk: float32 copies of x, noise,
    LR latent, estimate, x0 and the DiT tiler's blend accumulator."""
    return batch * latent_frames * latent_h * latent_w * signature.latent_channels * FP32 * LATENT_STATE_COPIES


# ---------------------------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------------------------

# ComfyUI's own estimates (comfy/sd.py, VAE.__init__), in bytes per dtype byte per OUTPUT pixel of one frame:
# they are what `VAE.decode` / `VAE.encode` ask `load_models_gpu` to free, so using them keeps the plan consistent
# with what ComfyUI itself will reserve. Wan2.1 decode: 7000 * h * w * 64 for latent h x w; encode 6000 * H * W.
# Wan2.2 decode: 8000 * h * w * 256; encode 3300 * H * W.
VAE_DECODE_PER_PX = {8: 7000, 16: 8000}
VAE_ENCODE_PER_PX = {8: 6000, 16: 3300}
LATENT_CHANNELS_FOR_STRIDE = {8: 16, 16: 48}


def _per_px(table, vae_stride, what):
    if vae_stride not in table:
        raise ValueError(f"no {what} memory model for a VAE with spatial stride {vae_stride}; Wan VAEs have 8 or 16")
    return table[vae_stride]


def decode_bytes(vae_stride, tile_latent_h, tile_latent_w, dtype_bytes, out_frames=None):
    """Device bytes to decode one spatial tile of `tile_latent_h x tile_latent_w` latents.

    The Wan decoders run frame by frame with a causal cache (comfyui-integration.md §8), so the working set
    follows the spatial tile, not the frame count: ComfyUI's `7000 * h * w * 64 * dtype` (Wan2.1; 8000 * 256
    for Wan2.2). Independent of T when `out_frames` is None.

    One T-dependent term is real but small: WanVAE.decode concatenates every decoded frame of the tile on the
    device (`torch.cat([out, out_], 2)`), so `out_frames` adds 2 copies (the cat) of 3 x T x H x W in the VAE
    dtype: 81 frames add 7 % to the Wan2.1 figure."""
    px = tile_latent_h * vae_stride * tile_latent_w * vae_stride
    total = _per_px(VAE_DECODE_PER_PX, vae_stride, "decode") * px * dtype_bytes
    if out_frames:
        total += 2 * 3 * out_frames * px * dtype_bytes
    return total


def encode_bytes(vae_stride, tile_h_px, tile_w_px, dtype_bytes, frames=None):
    """Device bytes to encode one spatial tile of `tile_h_px x tile_w_px` pixels (ComfyUI's `6000 * H * W *
    dtype` for Wan2.1, 3300 for Wan2.2; the encoder works on 4 frames at a time with a cache). `frames` adds the
    pixel input ComfyUI moves to the device whole (3 x T x H x W) and the concatenated latent output."""
    px = tile_h_px * tile_w_px
    total = _per_px(VAE_ENCODE_PER_PX, vae_stride, "encode") * px * dtype_bytes
    if frames:
        latent_frames = (frames - 1) // TEMPORAL_STRIDE + 1
        channels = LATENT_CHANNELS_FOR_STRIDE.get(vae_stride, 48)
        total += 3 * frames * px * dtype_bytes + 2 * channels * latent_frames * (px // vae_stride ** 2) * dtype_bytes
    return total


# ---------------------------------------------------------------------------------------------------------------
# Host RAM
# ---------------------------------------------------------------------------------------------------------------

# float32 [T, H, W, 3] copies of a chunk at the OUTPUT size alive at the host peak (decode of the last tile):
# (1) the LR frames resized to the output size, (2) their grid-padded copy for the encoder, (3) the decoded tile
# as the VAE returns it on the CPU, (4) ComfyUI's process_output copy, (5) ComfyUI's pixel_samples buffer, (6) the
# feather-blend accumulator that becomes the chunk output (the stitcher's cross-fade tail is a slice of it).
# (3)-(5) are one tile each when decoding is tiled; counting them at full size keeps this an upper bound.
HOST_FLOAT_COPIES = 6
HOST_WRITER_BYTES_PER_VALUE = 1  # uint8 frames handed to a video writer


def chunk_host_bytes(chunk_frames, out_h, out_w):
    """Host RAM of one chunk in flight: HOST_FLOAT_COPIES float32 [T, H, W, 3] copies plus the uint8 writer
    buffer. The whole-video IMAGE a node returns comes on top (`output_host_bytes`)."""
    values = chunk_frames * out_h * out_w * 3
    return values * (HOST_FLOAT_COPIES * FP32 + HOST_WRITER_BYTES_PER_VALUE)


def output_host_bytes(num_frames, out_h, out_w):
    """The float32 IMAGE [N, H, W, 3] of the whole upscaled video, if the node returns it rather than streaming
    to a file."""
    return num_frames * out_h * out_w * 3 * FP32


def _read_int(path):
    try:
        with open(path) as handle:
            text = handle.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def host_available_bytes():
    """RAM this process can still use: psutil's `available` (or /proc/meminfo MemAvailable), capped by the
    cgroup memory limit when the process runs in a container."""
    available = None
    try:
        import psutil

        available = int(psutil.virtual_memory().available)
    except Exception:  # psutil missing or unusable
        try:
            with open("/proc/meminfo") as handle:
                for line in handle:
                    if line.startswith("MemAvailable:"):
                        available = int(line.split()[1]) * KiB
                        break
        except OSError:
            pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            available = 0
    for limit_path, usage_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_path), _read_int(usage_path)
        if limit is not None and usage is not None and limit < (1 << 60):
            available = min(available, max(0, limit - usage))
    return available


# ---------------------------------------------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------------------------------------------

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


def fmt(num_bytes):
    if num_bytes >= GiB:
        return f"{num_bytes / GiB:.2f} GiB"
    return f"{num_bytes / MiB:.0f} MiB"


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
    options: dict = field(default_factory=dict, compare=False)

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
                f"DiT {fmt(self.dit_bytes)}, decode {fmt(self.decode_bytes)}, encode {fmt(self.encode_bytes)} "
                f"of {fmt(self.budget_bytes)} device; host {fmt(self.host_bytes)} of "
                f"{fmt(self.host_budget_bytes)} RAM")
        if self.warnings:
            line += " | WARNING: " + "; ".join(self.warnings)
        return line


def _estimate(p: Plan) -> Plan:
    o = p.options
    sig = p.signature
    lat_h, lat_w = p.latent_hw
    latent_frames = (p.chunk_frames - 1) // TEMPORAL_STRIDE + 1
    tile_h, tile_w = p.dit_tile
    dit = dit_step_bytes(sig, latent_frames, tile_h, tile_w, o["dtype_bytes"], o["batch"], o["shared_blocks"],
                         **o["dit_options"])
    dit += latent_state_bytes(sig, latent_frames, lat_h, lat_w, o["batch"])
    tile_px_h = min(p.decode_tile, lat_h * sig.vae_stride)
    tile_px_w = min(p.decode_tile, lat_w * sig.vae_stride)
    decode = decode_bytes(sig.vae_stride, tile_px_h // sig.vae_stride, tile_px_w // sig.vae_stride,
                          o["vae_dtype_bytes"], out_frames=p.chunk_frames)
    encode = encode_bytes(sig.vae_stride, tile_px_h, tile_px_w, o["vae_dtype_bytes"], frames=p.chunk_frames)
    host = chunk_host_bytes(p.chunk_frames, lat_h * sig.vae_stride, lat_w * sig.vae_stride)
    if not o["stream_output"]:
        host += output_host_bytes(p.num_frames, p.out_h, p.out_w)
    return replace(p, dit_bytes=dit, decode_bytes=decode, encode_bytes=encode, host_bytes=host)


def _round_down(value, multiple):
    return value // multiple * multiple


def chunk_candidates(num_frames, min_frames=MIN_CHUNK_FRAMES, max_frames=MAX_AUTO_CHUNK_FRAMES):
    """4n+1 chunk lengths, longest first: from min(the whole video, max_frames) down to min_frames."""
    top = min(frames_on_grid(num_frames), _round_down(max(max_frames, MIN_CHUNK_FRAMES) - 1, TEMPORAL_STRIDE) + 1)
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
    start_h = min(latent_h, _round_down(train_h, multiple))
    start_w = min(latent_w, _round_down(train_w, multiple))
    floor_h, floor_w = min(latent_h, min_tile), min(latent_w, min_tile)
    candidates = [whole]
    long_is_h = start_h >= start_w
    long_start, short_start = (start_h, start_w) if long_is_h else (start_w, start_h)
    long_floor, short_floor = (floor_h, floor_w) if long_is_h else (floor_w, floor_h)
    for long_side in range(long_start, long_floor - 1, -multiple):
        short_side = max(short_floor, min(short_start, _round_down(short_start * long_side // long_start,
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
         *, dtype_bytes=2, vae_dtype_bytes=2, batch=1, shared_blocks=False, overlap_frames=0,
         stream_output=False, reserve_bytes=DEFAULT_RESERVE_BYTES, max_chunk_frames=MAX_AUTO_CHUNK_FRAMES,
         **dit_options) -> Plan:
    """Choose chunk_frames, dit_tile and decode_tile for an `out_h x out_w` x `num_frames` output.

    `requested`: {"chunk_frames", "dit_tile", "decode_tile"}, each an int (dit_tile also an (h, w) pair, in
    latents) or "auto" (missing keys, None and 0 mean auto). Explicit values are validated and honoured; if their
    estimate exceeds a budget the plan carries a warning instead of refusing (the user asked for it).
    `budget_bytes`: device memory free for one stage's working set (ComfyUI's get_free_memory after the models
    are loaded); `reserve_bytes` is kept back from it. `host_budget_bytes`: RAM available (host_available_bytes).

    Auto choice, largest sizes that fit, in this order of preference:
      1. a frame no larger than the backbone's training resolution runs untiled in the DiT: the DiT tile is
         maximised first (against a 33-frame chunk, PREFERRED_MIN_CHUNK_FRAMES, or the shortest chunk when even
         the smallest tile needs it), then the chunk;
         a frame above the training resolution gains nothing from being untiled, so the chunk is maximised first
         (against the smallest tile), then the tile (the whole frame again if it still fits).
      2. the decode tile: the largest that fits with the chosen chunk.
    Chunks are at most `max_chunk_frames` (81, Wan's clip length) and at least 5 + `overlap_frames`.
    Raises ValueError, before anything is allocated, when even the smallest sizes cannot fit, naming the stage
    and its smallest estimate.
    """
    if num_frames < 1 or out_h < 1 or out_w < 1:
        raise ValueError(f"nothing to plan: {out_w}x{out_h} px, {num_frames} frames")
    if overlap_frames < 0 or overlap_frames % TEMPORAL_STRIDE:
        raise ValueError(f"overlap_frames must be a multiple of {TEMPORAL_STRIDE}, got {overlap_frames}")
    sig = signature
    multiple = sig.patch_size[1]
    options = {"dtype_bytes": dtype_bytes, "vae_dtype_bytes": vae_dtype_bytes, "batch": batch,
               "shared_blocks": shared_blocks, "stream_output": stream_output, "dit_options": dit_options,
               "overlap_frames": overlap_frames, "reserve_bytes": int(reserve_bytes)}
    device_budget = max(0, int(budget_bytes) - int(reserve_bytes))
    base = Plan(sig, out_h, out_w, num_frames, device_budget, int(host_budget_bytes), chunk_frames=MIN_CHUNK_FRAMES,
                dit_tile=(0, 0), decode_tile=0, options=options)
    lat_h, lat_w = base.latent_hw
    min_chunk = MIN_CHUNK_FRAMES + overlap_frames

    # Candidate lists, largest first; an explicit request is a list of one.
    want_chunk, want_tile, want_decode = (_requested(requested, name)
                                          for name in ("chunk_frames", "dit_tile", "decode_tile"))
    if want_chunk == "auto":
        chunks = chunk_candidates(num_frames, min_chunk, max_chunk_frames)
    else:
        chunks = [check_chunk(want_chunk, num_frames, overlap_frames)]
    if want_tile == "auto":
        tiles = dit_tile_candidates(sig, lat_h, lat_w, multiple)
    else:
        tiles = [_check_dit_tile(want_tile, lat_h, lat_w, multiple)]
    if want_decode == "auto":
        decodes = decode_tile_candidates(lat_h, lat_w, sig.vae_stride)
    else:
        decodes = [_check_decode_tile(want_decode, lat_h, lat_w, sig.vae_stride)]
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
    return replace(chosen, warnings=_warnings(chosen))


# Which requested sizes each stage's estimate depends on.
STAGE_SIZES = {"dit": ("chunk_frames", "dit_tile"), "decode": ("decode_tile", "chunk_frames"),
               "encode": ("decode_tile", "chunk_frames"), "chunk": ("chunk_frames",)}
STAGE_LABEL = {"dit": "DiT step", "decode": "VAE decode", "encode": "VAE encode", "chunk": "host RAM per chunk"}


def _over_budget(p: Plan):
    return [(stage, used, budget) for stage, used, budget in p._stage_usage() if used > budget]


def _refuse_or_warn(smallest: Plan, auto, device_budget):
    """Refuse when a stage whose sizes are all automatic cannot fit even at the smallest sizes."""
    for stage, used, budget in _over_budget(smallest):
        if all(size in auto for size in STAGE_SIZES[stage]):
            if stage == "chunk":
                where, advice = "RAM", "close other programs, or lower the output size or the frame count"
                if not smallest.options.get("stream_output"):
                    advice += ", or stream the output to a file instead of returning all frames"
            else:
                where, advice = "device memory", ("free VRAM (unload other models, start ComfyUI with --lowvram), "
                                                  "or lower the output size")
            raise ValueError(
                f"LiteVSR cannot fit {smallest.out_w}x{smallest.out_h} px x {smallest.num_frames} frames in the "
                f"memory available: even the smallest settings (chunk {smallest.chunk_frames} frames, DiT tile "
                f"{smallest.dit_tile[0]}x{smallest.dit_tile[1]} latents, VAE tile {smallest.decode_tile} px) need "
                f"{fmt(used)} for the {STAGE_LABEL[stage]}, but only {fmt(budget)} of {where} is free"
                + ("" if stage == "chunk" else
                   f" (after keeping {fmt(smallest.options.get('reserve_bytes', 0))} for workspaces)")
                + ". To fix: "
                f"{advice}. Nothing was allocated.")


def _warnings(p: Plan):
    return tuple(f"{STAGE_LABEL[stage]} estimate {fmt(used)} exceeds the {fmt(budget)} available with the "
                 f"requested sizes; set them to auto or lower them" for stage, used, budget in _over_budget(p))


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def check_chunk(value, num_frames, overlap_frames):
    if not _is_int(value) or value < MIN_CHUNK_FRAMES or (value - 1) % TEMPORAL_STRIDE:
        low = max(MIN_CHUNK_FRAMES, _round_down(int(value) - 1, TEMPORAL_STRIDE) + 1) if _is_int(value) else 33
        raise ValueError(f"chunk_frames must be 4n+1 (5, 9, ..., 33, 81) or 'auto', got {value!r}; "
                         f"use {low} or {low + TEMPORAL_STRIDE}")
    if value - 1 - overlap_frames < TEMPORAL_STRIDE:
        raise ValueError(f"chunk_frames {value} leaves no new frames with an overlap of {overlap_frames}")
    return min(value, max(frames_on_grid(num_frames), MIN_CHUNK_FRAMES))


def _check_dit_tile(value, lat_h, lat_w, multiple):
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or not all(_is_int(v) and v >= multiple and v % multiple == 0 for v in pair):
        raise ValueError(f"dit_tile must be 'auto', or an int or (height, width) pair of positive multiples of "
                         f"{multiple} in latent units, got {value!r}")
    return min(pair[0], lat_h), min(pair[1], lat_w)


def _check_decode_tile(value, lat_h, lat_w, stride):
    if not _is_int(value) or value < stride or value % stride:
        raise ValueError(f"decode_tile must be 'auto' or a positive multiple of the VAE stride ({stride} px), "
                         f"got {value!r}")
    return min(value, max(lat_h, lat_w) * stride)


# ---------------------------------------------------------------------------------------------------------------
# Out-of-memory back-off
# ---------------------------------------------------------------------------------------------------------------

STAGE_ATTR = "litevsr_stage"


class PlanOutOfMemory(RuntimeError):
    """Raised by `run_with_oom_retry` when halving cannot make the run fit."""


def default_is_oom(exc):
    """torch.OutOfMemoryError (CUDA/XPU), MemoryError, and RuntimeErrors whose message says the allocator ran
    out (CPU "can't allocate memory", MPS "out of memory")."""
    oom_types = (MemoryError,) + tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                                   getattr(torch.cuda, "OutOfMemoryError", None)) if t)
    if isinstance(exc, oom_types):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


@contextmanager
def oom_stage(name):
    """Tags any exception leaving the block with the stage it came from ("dit", "decode", "encode", "chunk"),
    so `run_with_oom_retry` knows which size to halve. The innermost tag wins."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; use one of {STAGES}")
    try:
        yield
    except BaseException as exc:
        if getattr(exc, STAGE_ATTR, None) is None:
            try:
                setattr(exc, STAGE_ATTR, name)
            except (AttributeError, TypeError):
                pass
        raise


def stage_of(exc, plan: Plan = None):
    """The stage an exception came from: its `litevsr_stage` (set by `oom_stage`) or `stage` attribute, on it or
    on its cause/context; otherwise a host MemoryError is the chunk, and a device OOM the device stage with the
    largest estimate relative to the budget."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        for attr in (STAGE_ATTR, "stage"):
            stage = getattr(exc, attr, None)
            if stage in STAGES:
                return stage
        nxt = exc.__cause__ or exc.__context__
        if nxt is None:
            break
        exc = nxt
    if type(exc) is MemoryError or plan is None:
        return "chunk"
    return max(("dit", "decode", "encode"), key=lambda s: getattr(plan, f"{s}_bytes"))


def _halve_chunk(p: Plan):
    floor = MIN_CHUNK_FRAMES + p.options.get("overlap_frames", 0)
    new = max(floor, _round_down((p.chunk_frames - 1) // 2, TEMPORAL_STRIDE) + 1)
    return None if new >= p.chunk_frames else ("chunk_frames", p.chunk_frames, new)


def _halve_dit_tile(p: Plan):
    lat_h, lat_w = p.latent_hw
    multiple = p.signature.patch_size[1]
    tile_h, tile_w = p.dit_tile
    floor_h, floor_w = min(lat_h, MIN_DIT_TILE), min(lat_w, MIN_DIT_TILE)
    if tile_h >= tile_w and tile_h > floor_h:  # halve the longer side: half the tokens
        new = (max(floor_h, _round_down(tile_h // 2, multiple)), tile_w)
    elif tile_w > floor_w:
        new = (tile_h, max(floor_w, _round_down(tile_w // 2, multiple)))
    elif tile_h > floor_h:
        new = (max(floor_h, _round_down(tile_h // 2, multiple)), tile_w)
    else:
        return None
    return "dit_tile", tuple(p.dit_tile), new


def _halve_decode_tile(p: Plan):
    stride = p.signature.vae_stride
    effective = max(p.decode_tile_hw_px)
    floor = min(effective, round_up(MIN_DECODE_TILE_PX, stride))
    new = max(floor, _round_down(effective // 2, stride))
    return None if new >= effective else ("decode_tile", p.decode_tile, new)


def halve_for(stage, p: Plan):
    """(size name, old, new) for the size to halve after an OOM in `stage`, or None when nothing is left.
    DiT: the longer side of the DiT tile (half the tokens), then the chunk once the tile is at its floor (the
    DiT's memory is linear in the chunk's latent frames too). Decode/encode: the VAE tile side. Chunk: frames."""
    if stage == "dit":
        return _halve_dit_tile(p) or _halve_chunk(p)
    if stage in ("decode", "encode"):
        return _halve_decode_tile(p)
    return _halve_chunk(p)


def release_cached_memory():
    """Drop what the failed attempt left behind: Python garbage, then the CUDA caching allocator's free blocks."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_with_oom_retry(step_fn, plan: Plan, is_oom=default_is_oom, on_retry=print, max_retries=4,
                       release=release_cached_memory):
    """`step_fn(plan)`, retried with the offending size halved after each out-of-memory error.

    `is_oom(exc)` says whether an exception is an OOM (pass ComfyUI's `model_management.OOM_EXCEPTION` check on
    GPU; the default covers torch.OutOfMemoryError, MemoryError and allocator messages); any other exception
    propagates unchanged. The stage is read from the exception (`oom_stage` context manager inside step_fn, or a
    `stage` attribute), see `stage_of`. Each retry calls `on_retry(message)` with the new settings and the new
    plan's describe() line. Gives up with PlanOutOfMemory after `max_retries` retries, or at once when the
    offending size is already at its floor. Returns `(result, plan_used)`.

    The failed attempt's exception is dropped before `release()` and the retry, so its traceback does not pin
    the tensors of the failed attempt (as ComfyUI's VAE.decode fallback does). Wrap the smallest unit of work
    that can be redone as a whole (one chunk: sample, decode) and carry the returned plan on to the next chunk,
    so later chunks start from the sizes that worked.
    """
    attempts = []
    while True:
        failure = None
        try:
            return step_fn(plan), plan
        except Exception as exc:  # interrupts (BaseException) pass untouched; non-OOM errors are re-raised
            if not is_oom(exc):
                raise
            first_line = str(exc).splitlines()[0][:200] if str(exc) else "no message"
            failure = (stage_of(exc, plan), f"{type(exc).__name__}: {first_line}")
        release()
        stage, reason = failure
        attempts.append(plan.describe())
        change = halve_for(stage, plan)
        if change is None or len(attempts) > max_retries:
            why = ("every size it depends on is already at its minimum" if change is None
                   else f"gave up after {max_retries} retries")
            raise PlanOutOfMemory(
                f"LiteVSR ran out of memory in the {STAGE_LABEL.get(stage, stage)} ({reason}) and {why}. "
                f"Last settings: {plan.describe()}. Free memory (close other programs, unload other models, "
                f"start ComfyUI with --lowvram), lower the output resolution, or set smaller chunk_frames / "
                f"dit_tile / decode_tile by hand.")
        name, old, new = change
        plan = plan.with_sizes(**{name: new})
        plan = replace(plan, auto=tuple(a for a in plan.auto if a != name))
        plan = replace(plan, warnings=_warnings(plan))
        on_retry(f"LiteVSR: out of memory in the {STAGE_LABEL.get(stage, stage)} ({reason}); retry "
                 f"{len(attempts)}/{max_retries} with {name} {_fmt_size(old)} -> {_fmt_size(new)}. "
                 f"{plan.describe()}")


def _fmt_size(value):
    return "x".join(map(str, value)) if isinstance(value, tuple) else str(value)
