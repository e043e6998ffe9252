"""VAE decode: the pack's tiled decode against an untiled decode and ComfyUI's own VAEDecodeTiled.

The tiny Wan2.1 VAE stand-in (loaded through ComfyUI's VAE class) decodes one random latent to a 960x960 output
(the pixel count of 1280x720; square so that one square tile size gives the 4x4 grid on both axes). Each variant
runs in one worker process, repeat after repeat: the time and the peak memory above what was in use before the call
(peak_memory), the medians kept, and the largest absolute difference from the untiled frames. ComfyUI's node runs
with its defaults except the tile (the same 4x4 grid): 64-frame temporal tiles with 8 frames of overlap, so at
FULL=1's 69 frames its temporal seam is inside the comparison.
"""
from statistics import median

from harness import peak_memory, run_worker, section, table, worker

VARIANTS = ("untiled", "pack_tiled", "comfyui_tiled")
OVERLAP_PX = 64


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
    import tiny_models
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

    measured = {name: {"seconds": [], "peak_bytes": []} for name in VARIANTS}
    frames = {}
    with torch.inference_mode():
        for call in calls(latent[:, :, :1]).values():  # warm-up on one latent frame: kernel choice, lazy init
            call()
        for repeat in range(config["repeats"]):
            for name, call in calls(latent).items():
                out, seconds, peak = peak_memory(call, device)
                measured[name]["seconds"].append(seconds)
                measured[name]["peak_bytes"].append(peak)
                if not repeat:
                    frames[name] = out.cpu()
                del out
    shape = list(frames["untiled"].shape)
    for name in VARIANTS[1:]:
        if list(frames[name].shape) != shape:
            raise ValueError(f"{name} decoded {list(frames[name].shape)}, untiled {shape}")
    diff = {name: float((frames[name] - frames["untiled"]).abs().max()) for name in VARIANTS[1:]}
    per_frame = {name: (frames[name] - frames["untiled"]).abs().flatten(1).amax(1).tolist() for name in VARIANTS[1:]}
    return {"output": shape, "latent": list(latent.shape), "tile_px": tile_px, "overlap_px": OVERLAP_PX,
            "tiles": config["tiles"], "vae_dim": config["vae_dim"], "device": str(device),
            "measured": measured,
            "median_seconds": {name: median(m["seconds"]) for name, m in measured.items()},
            "median_peak_mib": {name: round(median(m["peak_bytes"]) / 2 ** 20, 1) for name, m in measured.items()},
            "max_abs_diff": diff, "max_abs_diff_per_frame": per_frame}


@section("decode")
def decode_section(args):
    """Peak memory and time of three decodes of the same latent, and how far the tiled ones are from untiled."""
    config = {"output_px": args.decode_px, "frames": args.decode_frames, "tiles": 16, "vae_dim": 8,
              "repeats": args.repeats}
    print(f"\n[bench decode] tiny Wan2.1 VAE, {config['frames']} frames -> {args.decode_px}x{args.decode_px}, "
          f"4x4 tiles, {args.repeats} repeats", flush=True)
    run = run_worker("decode", config, args.scratch / "decode.log", timeout=args.timeout)
    peaks, seconds = run["median_peak_mib"], run["median_seconds"]
    run["rss_ratio"] = {name: round(peaks[name] / peaks["untiled"], 3) for name in VARIANTS[1:]}
    print("\n" + table(["decode", "seconds", "peak MiB above baseline", "x untiled", "max |diff| vs untiled"],
                       [[name, f"{seconds[name]:.2f}", peaks[name],
                         "1" if name == "untiled" else run["rss_ratio"][name],
                         "0" if name == "untiled" else f"{run['max_abs_diff'][name]:.2e}"] for name in VARIANTS]),
          flush=True)
    # Tiling exists to lower the peak. The differences are reported, not judged: a tile's mid-block attention sees
    # only its tile, so no tiled decode of a Wan VAE equals the untiled one (tests/test_tiled_decode.py bounds it).
    ok = run["rss_ratio"]["pack_tiled"] < 1
    headline = {"decode": {"tiled_rss_ratio": run["rss_ratio"]["pack_tiled"],
                           "comfyui_tiled_rss_ratio": run["rss_ratio"]["comfyui_tiled"],
                           "max_abs_diff": {name: round(v, 6) for name, v in run["max_abs_diff"].items()}}}
    return {"what": "peak memory above the process's baseline (allocator's peak on CUDA, VmHWM - VmRSS on the CPU) "
                    "and time of one decode; max |diff| of 0..1 frames against untiled", **run}, ok, headline
