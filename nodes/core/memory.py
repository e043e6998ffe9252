"""Memory estimates: the bytes each stage of a run needs.

Every estimate is a pure function of shapes (no allocation, no device query) and returns bytes: one DiT step
(adapter attached), one VAE decode or encode tile, the host RAM of one chunk in flight. `memory_plan.py` turns them
into the sizes a run uses, `oom.py` backs off when they were wrong, `host_memory.py` says how much RAM is free.

Stages are estimated separately because they run one after the other: ComfyUI may offload the DiT to make room
for the VAE (`VAE.decode` asks `load_models_gpu` for its own estimate), so each stage must fit on its own.

Pure python; imports nothing of ComfyUI.
"""
import math

from .backbones import dit_parameters, release_of, vae_family
from .geometry import TEMPORAL_STRIDE, TEXT_TOKENS, BackboneSignature, round_up

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
# blocks. Live tensors per token in units of the adapter width w (traced op by op): structure and refinement
# embeddings (2), the key windows of both streams (2), the queries entering the layer (1, held by the caller) and
# q (1), alive through the layer. Inside the attention (`WindowCrossAttention.attend`, whose locals are freed when
# it returns): the fused k/v projection (4), the SDPA output (1) and its head-merged copy (1): 12. At the MLP: the
# attention residual (1), the MLP input (1), the MLP hidden and its GELU (2 x mlp_ratio): 8 + 2 x mlp_ratio = 12
# for the default ratio 2. Windows pad the token grid to whole windows (1 x 8 x 8 tokens by default).
ADAPTER_ATTENTION_UNITS = 12
ADAPTER_MLP_BASE_UNITS = 8

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
    release = release_of(signature)
    return release.ffn_dim if release else 6 * signature.dim


def dit_tokens(signature: BackboneSignature, latent_frames, latent_h, latent_w):
    """Token count L = T * ceil(h / 2) * ceil(w / 2): the DiT pads the latent to whole 1x2x2 patches."""
    pt, ph, pw = signature.patch_size
    return -(-latent_frames // pt) * -(-latent_h // ph) * -(-latent_w // pw)


def dit_weight_bytes(signature: BackboneSignature, dtype_bytes, ffn_dim=None):
    """Parameter bytes of a Wan T2V DiT (for callers that budget before loading). Wan2.1-1.3B: 1.42 G parameters."""
    return dit_parameters(signature, ffn_dim or ffn_dim_of(signature)) * dtype_bytes


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
      adapter = L_win * batch * max(12, 8 + 2 mlp_ratio) * w * ab                features pass (before blocks)
      peak    = safety * (max(blocks, adapter)
                          + L * batch * 4 C * 4 B * 8                          float32 latent crops
                          + batch * 512 * text_dim * db)                        text context input

    Attention is PyTorch SDPA (memory-efficient / flash), so nothing is O(L^2): the estimate is linear in L.
    `shared_blocks=True` runs every block on a doubled batch (the adapter's condition branch): ~2x the block term.
    `options`: ffn_dim (default `ffn_dim_of`), adapter_width (dim), adapter_dtype_bytes (4: adapters run in
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


def decode_bytes(vae_stride, tile_latent_h, tile_latent_w, dtype_bytes, out_frames=None):
    """Device bytes to decode one spatial tile of `tile_latent_h x tile_latent_w` latents.

    The Wan decoders run frame by frame with a causal cache (ComfyUI's comfy/ldm/wan/vae.py), so the working set
    follows the spatial tile, not the frame count: ComfyUI's `7000 * h * w * 64 * dtype` (Wan2.1; 8000 * 256
    for Wan2.2). Independent of T when `out_frames` is None.

    One T-dependent term is real but small: WanVAE.decode concatenates every decoded frame of the tile on the
    device (`torch.cat([out, out_], 2)`), so `out_frames` adds 2 copies (the cat) of 3 x T x H x W in the VAE
    dtype: 81 frames add 7 % to the Wan2.1 figure."""
    px = tile_latent_h * vae_stride * tile_latent_w * vae_stride
    total = vae_family(vae_stride).vae_decode_per_px * px * dtype_bytes
    if out_frames:
        total += 2 * 3 * out_frames * px * dtype_bytes
    return total


def encode_bytes(vae_stride, tile_h_px, tile_w_px, dtype_bytes, frames=None):
    """Device bytes to encode one spatial tile of `tile_h_px x tile_w_px` pixels (ComfyUI's `6000 * H * W *
    dtype` for Wan2.1, 3300 for Wan2.2; the encoder works on 4 frames at a time with a cache). `frames` adds the
    pixel input ComfyUI moves to the device whole (3 x T x H x W) and the concatenated latent output."""
    px = tile_h_px * tile_w_px
    total = vae_family(vae_stride).vae_encode_per_px * px * dtype_bytes
    if frames:
        latent_frames = (frames - 1) // TEMPORAL_STRIDE + 1
        channels = vae_family(vae_stride).latent_channels
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

