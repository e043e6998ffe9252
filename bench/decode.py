"""VAE decode: three comparisons, each on one random latent, its variants interleaved in one worker process round
after round until their repeats agree (harness.RepeatPolicy): the time (fastest repeat) and the peak memory above
what was in use before the call (peak_memory, median) of every variant.

- Tiled against untiled memory (worker `decode`): the Wan2.1 VAE at width 8 (a stand-in small enough to decode
  960x960 in seconds) decodes to a 960x960 output (the pixel count of 1280x720; square so that one square tile size
  gives the 4x4 grid on both axes) untiled through ComfyUI's VAE.decode, 4x4-tiled through the pack's decode_tiled,
  and through ComfyUI's VAEDecodeTiled, with the largest absolute difference from the untiled frames. ComfyUI's node
  runs with its defaults except the tile (the same 4x4 grid): 64-frame temporal tiles with 8 frames of overlap, so
  at FULL=1's 69 frames its temporal seam is inside the comparison. Its times are not the cost of tiling: a VAE this
  narrow on small tiles runs PyTorch's slow CPU conv3d. aten picks `slow_conv3d_forward` over mkldnn when N*C*T*H of
  a conv3d input is small (at most 20480, the heuristic in aten's Convolution.cpp), which the width-8 VAE hits on
  tiles (a profile counts 1568 slow_conv3d calls tiled, 72 untiled), hence 3.1-3.4x the untiled time for 1.44x the
  pixels; ComfyUI's per-call overhead is not it (VAE.decode costs about 1 ms more per call than the model's own
  decode on the CPU). A real-width VAE (96) never takes that path. The third comparison measures the time.
- Decoders (worker `decoders`): the full Wan2.1 VAE (width 96, as released), the light VAE geometry (the Wan2.1
  VAE at LIGHTVAE_DIM, standing for lightvaew2_1) and the tiny TAEHV decoder (ComfyUI's comfy/taesd/taehv.py with
  16 latent channels: the architecture and size of taew2_1 / lighttaew2_1), random float32 weights, each decoding
  the same latent untiled through the pack's decode_tiled (one tile), 17 frames at 832x480. The full VAE takes
  minutes per decode on a CPU, so this comparison runs under its own repeat policy (decoders_policy).
- Tiling time (worker `tiled_time`): the tiny decoder through the pack's decode_tiled, one tile against a grid of
  at most 16 square tiles with 32 px of overlap, 17 frames at 1280x720. No square tile splits 16:9 into 4x4: the
  grid is that of the smallest square tile giving at most 16 tiles (5x3 here). Its tiles decode more pixels than
  the frame holds (`pixel_ratio`, from the grid), so the time ratio is read next to the time per decoded pixel.
"""
from dataclasses import replace
from functools import partial

from bench.harness import (CONFIRM, RepeatPolicy, peak_memory, publish, repeat_policy, repeat_until_settled,
                           run_worker, section, summarize_records, table, verdict, worker)

VARIANTS = ("untiled", "pack_tiled", "comfyui_tiled")
OVERLAP_PX = 64
GRID_TILES = 16  # 4x4
# Time: the fastest repeat (a neighbour only slows a decode). Peak memory: the median (a neighbour does not take it).
STATISTICS = {"seconds": "min", "peak_bytes": "median"}
RSS_RATIOS = {"pack_tiled": "tiled_rss_ratio", "comfyui_tiled": "comfyui_tiled_rss_ratio"}  # headline names

# The decoders: output (width, height), frames, and the widths of the two Wan2.1 VAE geometries.
DECODERS_OUTPUT = (832, 480)  # Wan2.1-1.3B's resolution
DECODERS_FRAMES = 17
FULL_VAE_DIM = 96  # the released Wan2.1 VAE
# lightvaew2_1: LightX2V prunes 75 % of every width of the dim-96 Wan2.1 VAE (pruning_rate 0.75), encoder and
# decoder alike; its 32160476-byte fp32 file matches WanVAE(dim=24)
LIGHTVAE_DIM = 24
DECODERS = ("full_vae", "light_vae", "tiny")
# A full-VAE decode of 17 frames at 832x480 takes 7-8 minutes on 2 CPU cores, a round of the three decoders about 9:
# this comparison runs the rounds that can confirm a fastest repeat (CONFIRM), then more while the fastest three
# disagree, up to DECODERS_MAX_REPEATS, starting none after DECODERS_MAX_SECONDS (a --repeat-seconds sized for
# seconds-long sets would end it after the third round however disturbed: one slow round then withholds it all).
DECODERS_MAX_REPEATS = 6
DECODERS_MAX_SECONDS = 3600.0

# Tiling time: the tiny decoder, the output (width, height), frames, overlap and the most tiles of the grid.
TILED_TIME_OUTPUT = (1280, 720)
TILED_TIME_FRAMES = 17
TILED_TIME_OVERLAP_PX = 32
TILED_TIME_VARIANTS = ("untiled", "tiled")

# The issue's targets for the headline figures: (comparison, bound).
TARGETS = {"tiny_speedup": (">=", 5.0), "tiny_memory_ratio": ("<=", 0.25), "tiled_time_ratio": ("<=", 1.3)}


def grid_tile_px(latent_height, latent_width, stride, tiles, overlap_px):
    """The smallest square tile (px, a multiple of `stride`) whose grid over the latent has at most `tiles` tiles:
    the 4x4 grid of a square latent for 16, the nearest coarser grid where the shape admits none."""
    from comfyui_litevsr.nodes.core.decode import tile_count

    for tile_px in range(overlap_px + stride, max(latent_height, latent_width) * stride + stride, stride):
        if tile_count(latent_height, latent_width, stride, tile_px, overlap_px) <= tiles:
            return tile_px
    raise ValueError(f"no tile gives at most {tiles} tiles over {latent_height}x{latent_width} latent px")


def grid_geometry(latent_height, latent_width, stride, tile_px, overlap_px):
    """The tile grid decode_tiled walks: tile rows, tile columns, and the pixels its tiles decode ÷ the output's."""
    from comfyui_litevsr.nodes.core.decode import decode_latent_tiling
    from comfyui_litevsr.nodes.core.tiling import tile_spans

    tile, overlap = decode_latent_tiling(tile_px, overlap_px, stride)
    rows, cols = tile_spans(latent_height, tile, overlap), tile_spans(latent_width, tile, overlap)
    decoded = sum(r.length for r in rows) * sum(c.length for c in cols)
    return {"grid": [len(rows), len(cols)], "pixel_ratio": decoded / (latent_height * latent_width)}


def random_latent(frames, latent_height, latent_width):
    """The Wan2.1 latent [1, 16, T', h, w] of a `frames`-frame clip, drawn from a fixed seed."""
    import torch

    latent_frames = (frames - 1) // 4 + 1
    return torch.randn(1, 16, latent_frames, latent_height, latent_width, generator=torch.Generator().manual_seed(0))


def untiled_decode(vae, latent):
    """The pack's decode with one tile over the whole latent: a plain decode through the pack's decoder path."""
    from comfyui_litevsr.nodes.decoders import decode_tiled

    stride = vae.spacial_compression_decode()
    return decode_tiled(vae, latent, stride * max(latent.shape[-2:]), 0)


def measure_interleaved(decoders, latent, policy, device):
    """Every decoder (name -> function(latent) -> frames) warmed up on the first latent frame (kernel choice, lazy
    init), then all decoding `latent` interleaved under `policy`. Returns the measurement fields of a worker's
    result (policy, shapes, summary, fastest seconds, median peak MiB) and the frames of each one's first repeat.
    Raises if they decoded different shapes: a comparison of different outputs is none."""
    import torch

    frames = {}

    def measure(name, decode):
        def once():
            out, seconds, peak = peak_memory(lambda: decode(latent), device)
            if name not in frames:
                frames[name] = out.cpu()
            return {"seconds": seconds, "peak_bytes": peak}

        return once

    with torch.inference_mode():
        for decode in decoders.values():
            decode(latent[:, :, :1])
        records = repeat_until_settled({name: measure(name, decode) for name, decode in decoders.items()}, policy,
                                       STATISTICS)
    summary = summarize_records(records, STATISTICS, policy.spread_limit)
    shapes = {name: list(out.shape) for name, out in frames.items()}
    if len({tuple(shape) for shape in shapes.values()}) != 1:
        raise ValueError(f"the variants of one comparison decoded different shapes: {shapes}")
    return {"policy": policy.to_dict(), "latent": list(latent.shape), "output": shapes[next(iter(decoders))],
            "summary": summary, "seconds": {name: m["seconds"]["value"] for name, m in summary.items()},
            "median_peak_mib": {name: round(m["peak_bytes"]["value"] / 2 ** 20, 1) for name, m in summary.items()},
            }, frames


@worker("decode")
def decode_worker(config):
    import comfy.sd
    import nodes as comfy_nodes
    from tools import tiny_models
    from comfyui_litevsr.nodes.decoders import decode_tiled

    vae = comfy.sd.VAE(sd=tiny_models.tiny_wan21_vae_state_dict(dim=config["vae_dim"]))
    stride = vae.spacial_compression_decode()
    side = config["output_px"] // stride
    tile_px = grid_tile_px(side, side, stride, GRID_TILES, OVERLAP_PX)

    decoders = {"untiled": lambda z: vae.decode(z)[0].float(),
                "pack_tiled": lambda z: decode_tiled(vae, z, tile_px, OVERLAP_PX),
                "comfyui_tiled": lambda z: comfy_nodes.VAEDecodeTiled().decode(vae, {"samples": z}, tile_size=tile_px,
                                                                              overlap=OVERLAP_PX)[0].float()}
    run, frames = measure_interleaved(decoders, random_latent(config["frames"], side, side),
                                      RepeatPolicy(**config["policy"]), vae.device)
    difference = {name: (frames[name] - frames["untiled"]).abs() for name in VARIANTS[1:]}
    return {**run, "tile_px": tile_px, "overlap_px": OVERLAP_PX, "tiles": GRID_TILES, "vae_dim": config["vae_dim"],
            "device": str(vae.device), "max_abs_diff": {name: float(d.max()) for name, d in difference.items()},
            "max_abs_diff_per_frame": {name: d.flatten(1).amax(1).tolist() for name, d in difference.items()}}


@worker("decoders")
def decoders_worker(config):
    import torch

    import comfy.sd
    from tools import tiny_models

    vaes = {"full_vae": comfy.sd.VAE(sd=tiny_models.tiny_wan21_vae_state_dict(dim=config["full_dim"])),
            "light_vae": comfy.sd.VAE(sd=tiny_models.tiny_wan21_vae_state_dict(dim=config["light_dim"])),
            "tiny": comfy.sd.VAE(sd=tiny_models.tiny_decoder_state_dict(16, dtype=torch.float32))}
    strides = {vae.spacial_compression_decode() for vae in vaes.values()}
    if len(strides) != 1:
        raise ValueError(f"the decoders compress space differently ({strides}): they cannot share one latent")
    stride = strides.pop()
    width, height = config["output"]
    run, _ = measure_interleaved({name: partial(untiled_decode, vae) for name, vae in vaes.items()},
                                 random_latent(config["frames"], height // stride, width // stride),
                                 RepeatPolicy(**config["policy"]), vaes["tiny"].device)
    return {**run, "full_dim": config["full_dim"], "light_dim": config["light_dim"],
            "dtype": {name: str(vae.vae_dtype).replace("torch.", "") for name, vae in vaes.items()},
            "params_m": {name: round(sum(p.numel() for p in vae.first_stage_model.parameters()) / 1e6, 1)
                         for name, vae in vaes.items()}, "device": str(vaes["tiny"].device)}


@worker("tiled_time")
def tiled_time_worker(config):
    import torch

    import comfy.sd
    from tools import tiny_models
    from comfyui_litevsr.nodes.decoders import decode_tiled

    vae = comfy.sd.VAE(sd=tiny_models.tiny_decoder_state_dict(16, dtype=torch.float32))
    stride = vae.spacial_compression_decode()
    width, height = config["output"]
    overlap_px = config["overlap_px"]
    tile_px = grid_tile_px(height // stride, width // stride, stride, GRID_TILES, overlap_px)
    run, frames = measure_interleaved({"untiled": partial(untiled_decode, vae),
                                       "tiled": lambda z: decode_tiled(vae, z, tile_px, overlap_px)},
                                      random_latent(config["frames"], height // stride, width // stride),
                                      RepeatPolicy(**config["policy"]), vae.device)
    return {**run, **grid_geometry(height // stride, width // stride, stride, tile_px, overlap_px),
            "tile_px": tile_px, "overlap_px": overlap_px, "dtype": str(vae.vae_dtype).replace("torch.", ""),
            "device": str(vae.device), "max_abs_diff": float((frames["tiled"] - frames["untiled"]).abs().max())}


def decoders_policy(policy):
    """The repeat policy of the decoder comparison: `policy` with at most CONFIRM rounds required, at most
    DECODERS_MAX_REPEATS rounds, and new rounds for at least DECODERS_MAX_SECONDS."""
    return replace(policy, min_repeats=min(policy.min_repeats, CONFIRM),
                   max_repeats=min(policy.max_repeats, DECODERS_MAX_REPEATS),
                   max_seconds=max(policy.max_seconds, DECODERS_MAX_SECONDS))


def _size(text):
    width, height = (int(v) for v in text.lower().split("x"))
    return [width, height]


def _ratio(run, name, reference, measurement):
    """`name`'s figure ÷ `reference`'s, for "seconds" (fastest) or "median_peak_mib"."""
    return run[measurement][name] / run[measurement][reference]


def _variant_rows(run, names):
    seconds, peaks, summary = run["seconds"], run["median_peak_mib"], run["summary"]
    return [[name, f"{seconds[name]:.2f}", summary[name]["seconds"]["spread"], len(summary[name]["seconds"]["repeats"]),
             peaks[name], summary[name]["peak_bytes"]["spread"]] for name in names]


VARIANT_HEADERS = ["decode", "fastest s", "spread", "repeats", "peak MiB above baseline", "spread"]


def _target_met(figure, value):
    relation, bound = TARGETS[figure]
    return value >= bound if relation == ">=" else value <= bound


@section("decode")
def decode_section(args):
    """Peak memory and time of three decodes of the same latent, and how far the tiled ones are from untiled; the
    full, light and tiny decoders against each other; and the time of tiling the tiny decoder."""
    policy = repeat_policy(args)
    config = {"output_px": args.decode_px, "frames": args.decode_frames, "vae_dim": 8, "policy": policy.to_dict()}
    print(f"\n[bench decode] Wan2.1 VAE width 8, {config['frames']} frames -> {args.decode_px}x{args.decode_px}, "
          f"4x4 tiles, {policy.describe()}", flush=True)
    run = run_worker("decode", config, args.scratch / "decode.log", timeout=args.timeout)
    peaks, summary = run["median_peak_mib"], run["summary"]
    run["rss_ratio"] = {name: round(peaks[name] / peaks["untiled"], 3) for name in VARIANTS[1:]}
    print("\n" + table(VARIANT_HEADERS + ["x untiled", "max |diff| vs untiled"],
                       [row + ["1" if name == "untiled" else run["rss_ratio"][name],
                               "0" if name == "untiled" else f"{run['max_abs_diff'][name]:.2e}"]
                        for name, row in zip(VARIANTS, _variant_rows(run, VARIANTS))]), flush=True)

    heavy = decoders_policy(policy)
    decoders_config = {"output": _size(args.decoders_size), "frames": args.decoders_frames, "full_dim": FULL_VAE_DIM,
                       "light_dim": LIGHTVAE_DIM, "policy": heavy.to_dict()}
    print(f"\n[bench decode] decoders: Wan2.1 VAE width {FULL_VAE_DIM} (full) and {LIGHTVAE_DIM} (light), tiny "
          f"TAEHV; {args.decoders_frames} frames -> {args.decoders_size}, untiled, {heavy.describe()}", flush=True)
    decoders = run_worker("decoders", decoders_config, args.scratch / "decoders.log", timeout=args.timeout)
    print("\n" + table(VARIANT_HEADERS + ["M params"], [row + [decoders["params_m"][name]] for name, row in
                                                       zip(DECODERS, _variant_rows(decoders, DECODERS))]), flush=True)

    tiled_config = {"output": _size(args.tiled_time_size), "frames": args.tiled_time_frames,
                    "overlap_px": TILED_TIME_OVERLAP_PX, "policy": policy.to_dict()}
    print(f"\n[bench decode] tiling time: tiny TAEHV, {args.tiled_time_frames} frames -> {args.tiled_time_size}, "
          f"at most {GRID_TILES} tiles, overlap {TILED_TIME_OVERLAP_PX} px, {policy.describe()}", flush=True)
    tiled = run_worker("tiled_time", tiled_config, args.scratch / "tiled_time.log", timeout=args.timeout)
    print("\n" + table(VARIANT_HEADERS, _variant_rows(tiled, TILED_TIME_VARIANTS)), flush=True)
    print(f"grid {tiled['grid'][0]}x{tiled['grid'][1]} of {tiled['tile_px']} px: the tiles decode "
          f"{tiled['pixel_ratio']:.3f}x the output's pixels", flush=True)

    # Tiling exists to lower the peak. The differences are reported, not judged: a tile's mid-block attention sees
    # only its tile, so no tiled decode of a Wan VAE equals the untiled one (tests/test_tiled_decode.py bounds it).
    ok = run["rss_ratio"]["pack_tiled"] < 1
    time_ratio = _ratio(tiled, "tiled", "untiled", "seconds")
    ratios = {**{figure: run["rss_ratio"][name] for name, figure in RSS_RATIOS.items()},
              "tiny_speedup": _ratio(decoders, "full_vae", "tiny", "seconds"),
              "tiny_memory_ratio": _ratio(decoders, "tiny", "full_vae", "median_peak_mib"),
              "light_vae_speedup": _ratio(decoders, "full_vae", "light_vae", "seconds"),
              "light_vae_memory_ratio": _ratio(decoders, "light_vae", "full_vae", "median_peak_mib"),
              "tiled_time_ratio": time_ratio, "tiled_time_per_pixel_ratio": time_ratio / tiled["pixel_ratio"]}

    def trust(comparison, measurement, *names):
        return verdict(comparison["summary"][name][measurement] for name in names)

    trusts = {**{figure: trust(run, "peak_bytes", name, "untiled") for name, figure in RSS_RATIOS.items()},
              "tiny_speedup": trust(decoders, "seconds", "full_vae", "tiny"),
              "tiny_memory_ratio": trust(decoders, "peak_bytes", "full_vae", "tiny"),
              "light_vae_speedup": trust(decoders, "seconds", "full_vae", "light_vae"),
              "light_vae_memory_ratio": trust(decoders, "peak_bytes", "full_vae", "light_vae"),
              "tiled_time_ratio": trust(tiled, "seconds", "tiled", "untiled"),
              "tiled_time_per_pixel_ratio": trust(tiled, "seconds", "tiled", "untiled")}
    targets = {figure: {"relation": relation, "bound": bound, "met": _target_met(figure, ratios[figure])}
               for figure, (relation, bound) in TARGETS.items()}
    headline = {"decode": {**publish(ratios, trusts), "tiled_pixel_ratio": round(tiled["pixel_ratio"], 3),
                           "max_abs_diff": {name: round(v, 6) for name, v in run["max_abs_diff"].items()},
                           "seconds": publish(run["seconds"], {name: trust(run, "seconds", name) for name in VARIANTS},
                                              digits=2)}}
    comparisons = (run, decoders, tiled)
    return {"what": "peak memory above the process's baseline (allocator's peak on CUDA, VmHWM - VmRSS on the CPU; "
                    "median of repeats) and time of one decode (fastest repeat); max |diff| of 0..1 frames against "
                    "untiled", **run, "decoders": decoders, "tiled_time": tiled, "targets": targets,
            **verdict(s for comparison in comparisons for sets in comparison["summary"].values()
                      for s in sets.values())}, ok, headline
