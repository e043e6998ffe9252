"""VAE decode: the pack's tiled decode against an untiled decode and ComfyUI's own VAEDecodeTiled.

The tiny Wan2.1 VAE stand-in (loaded through ComfyUI's VAE class) decodes one random latent to a 960x960 output
(the pixel count of 1280x720; square so that one square tile size gives the 4x4 grid on both axes). Each variant
runs in one worker process, the three interleaved round after round until their repeats agree (harness.RepeatPolicy):
the time (fastest repeat) and the peak memory above what was in use before the call (peak_memory, median), and the
largest absolute difference from the untiled frames. ComfyUI's node runs
with its defaults except the tile (the same 4x4 grid): 64-frame temporal tiles with 8 frames of overlap, so at
FULL=1's 69 frames its temporal seam is inside the comparison.
"""
from bench.harness import (RepeatPolicy, peak_memory, publish, repeat_policy, repeat_until_settled, run_worker, section,
                     summarize_records, table, verdict, worker)

VARIANTS = ("untiled", "pack_tiled", "comfyui_tiled")
OVERLAP_PX = 64
# Time: the fastest repeat (a neighbour only slows a decode). Peak memory: the median (a neighbour does not take it).
STATISTICS = {"seconds": "min", "peak_bytes": "median"}
RSS_RATIOS = {"pack_tiled": "tiled_rss_ratio", "comfyui_tiled": "comfyui_tiled_rss_ratio"}  # headline names


def grid_tile_px(latent_side, stride, tiles, overlap_px=OVERLAP_PX):
    """The smallest square tile (px, a multiple of `stride`) that covers a square latent in exactly `tiles` tiles."""
    from comfyui_litevsr.nodes.core.decode import tile_count

    for tile_px in range(overlap_px + stride, latent_side * stride + stride, stride):
        if tile_count(latent_side, latent_side, stride, tile_px, overlap_px) == tiles:
            return tile_px
    raise ValueError(f"no tile gives {tiles} tiles over {latent_side} latent px")


@worker("decode")
def decode_worker(config):
    import torch

    import comfy.sd
    import nodes as comfy_nodes
    from tools import tiny_models
    from comfyui_litevsr.nodes.core.decode import tiled_decode

    vae = comfy.sd.VAE(sd=tiny_models.tiny_wan21_vae_state_dict(dim=config["vae_dim"]))
    stride = vae.spacial_compression_decode()
    side = config["output_px"] // stride
    latent_frames = (config["frames"] - 1) // 4 + 1
    latent = torch.randn(1, 16, latent_frames, side, side, generator=torch.Generator().manual_seed(0))
    tile_px = grid_tile_px(side, stride, config["tiles"])
    device = vae.device

    def calls(z):
        return {
            "untiled": lambda: vae.decode(z)[0].float(),
            "pack_tiled": lambda: tiled_decode(z, lambda tile: vae.decode(tile)[0], stride, tile_px, OVERLAP_PX),
            "comfyui_tiled": lambda: comfy_nodes.VAEDecodeTiled().decode(vae, {"samples": z}, tile_size=tile_px,
                                                                         overlap=OVERLAP_PX)[0].float(),
        }

    frames = {}

    def measure(name, call):
        def once():
            out, seconds, peak = peak_memory(call, device)
            if name not in frames:  # the first repeat's frames, for the differences
                frames[name] = out.cpu()
            return {"seconds": seconds, "peak_bytes": peak}

        return once

    policy = RepeatPolicy(**config["policy"])
    with torch.inference_mode():
        for call in calls(latent[:, :, :1]).values():  # warm-up on one latent frame: kernel choice, lazy init
            call()
        records = repeat_until_settled({name: measure(name, call) for name, call in calls(latent).items()}, policy,
                                       STATISTICS)
    summary = summarize_records(records, STATISTICS, policy.spread_limit)
    shape = list(frames["untiled"].shape)
    for name in VARIANTS[1:]:
        if list(frames[name].shape) != shape:
            raise ValueError(f"{name} decoded {list(frames[name].shape)}, untiled {shape}")
    diff = {name: float((frames[name] - frames["untiled"]).abs().max()) for name in VARIANTS[1:]}
    per_frame = {name: (frames[name] - frames["untiled"]).abs().flatten(1).amax(1).tolist() for name in VARIANTS[1:]}
    return {"output": shape, "latent": list(latent.shape), "tile_px": tile_px, "overlap_px": OVERLAP_PX,
            "tiles": config["tiles"], "vae_dim": config["vae_dim"], "device": str(device), "policy": policy.to_dict(),
            "summary": summary,
            "seconds": {name: m["seconds"]["value"] for name, m in summary.items()},
            "median_peak_mib": {name: round(m["peak_bytes"]["value"] / 2 ** 20, 1) for name, m in summary.items()},
            "max_abs_diff": diff, "max_abs_diff_per_frame": per_frame}


@section("decode")
def decode_section(args):
    """Peak memory and time of three decodes of the same latent, and how far the tiled ones are from untiled."""
    config = {"output_px": args.decode_px, "frames": args.decode_frames, "tiles": 16, "vae_dim": 8,
              "policy": repeat_policy(args).to_dict()}
    print(f"\n[bench decode] tiny Wan2.1 VAE, {config['frames']} frames -> {args.decode_px}x{args.decode_px}, "
          f"4x4 tiles, {repeat_policy(args).describe()}", flush=True)
    run = run_worker("decode", config, args.scratch / "decode.log", timeout=args.timeout)
    peaks, seconds, summary = run["median_peak_mib"], run["seconds"], run["summary"]
    run["rss_ratio"] = {name: round(peaks[name] / peaks["untiled"], 3) for name in VARIANTS[1:]}
    run.update(verdict(s for sets in summary.values() for s in sets.values()))
    print("\n" + table(["decode", "fastest s", "spread", "peak MiB above baseline", "spread", "x untiled",
                        "max |diff| vs untiled"],
                       [[name, f"{seconds[name]:.2f}", summary[name]["seconds"]["spread"], peaks[name],
                         summary[name]["peak_bytes"]["spread"], "1" if name == "untiled" else run["rss_ratio"][name],
                         "0" if name == "untiled" else f"{run['max_abs_diff'][name]:.2e}"] for name in VARIANTS]),
          flush=True)
    # Tiling exists to lower the peak. The differences are reported, not judged: a tile's mid-block attention sees
    # only its tile, so no tiled decode of a Wan VAE equals the untiled one (tests/test_tiled_decode.py bounds it).
    ok = run["rss_ratio"]["pack_tiled"] < 1
    ratios = {figure: run["rss_ratio"][name] for name, figure in RSS_RATIOS.items()}
    memory = {figure: verdict([summary[name]["peak_bytes"], summary["untiled"]["peak_bytes"]])
              for name, figure in RSS_RATIOS.items()}
    headline = {"decode": {**publish(ratios, memory),
                           "max_abs_diff": {name: round(v, 6) for name, v in run["max_abs_diff"].items()},
                           "seconds": publish(seconds, {name: verdict([summary[name]["seconds"]]) for name in VARIANTS},
                                              digits=2)}}
    return {"what": "peak memory above the process's baseline (allocator's peak on CUDA, VmHWM - VmRSS on the CPU; "
                    "median of repeats) and time of one decode (fastest repeat); max |diff| of 0..1 frames against "
                    "untiled", **run}, ok, headline
