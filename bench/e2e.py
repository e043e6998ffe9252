"""End to end: output frames per second of a whole file-to-file upscale (tools/upscale.py's `run`, in a worker
process: read, plan, encode, denoise, decode, colour-correct, encode with audio), for 1, 2 and 4 sampling steps.

CPU (`e2e`): the tiny random-weight stand-ins on a short bigbuckbunny clip; the figure measures the pipeline's own
overhead around tiny models, not what real weights would give. GPU (`gpu`): the same with the real Wan2.1-1.3B
files from MODELS_DIR at 1080p output, plus the allocator's peak VRAM; without CUDA or MODELS_DIR it is skipped,
saying why. Model loading is timed apart and left out of the frame rate. The step counts are run interleaved, round
after round until their repeats agree (harness.RepeatPolicy); a frame rate is frames / the fastest repeat.
"""
from pathlib import Path

from bench.harness import (REPO, RepeatPolicy, publish, repeat_policy, repeat_until_settled, run_worker, section,
                     summarize_records, table, timed, verdict, worker)
from bench.stream import synth_clip


@worker("e2e")
def e2e_worker(config):
    import torch

    from tools import upscale as tool
    from tools.headless import Ranks

    ranks = Ranks(environ={})
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    models = ["--dit", config["dit"], "--vae", config["vae"]] if config.get("dit") else ["--stand-ins"]
    output = Path(config["scratch"]) / "e2e.mp4"

    def upscale(steps):
        argv = ["--input", config["input"], "--output", str(output), "--scale", str(config["scale"]),
                "--steps", str(steps), "--seed", "0", *models]
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        result, seconds = timed(lambda: tool.run(tool.parse_args(argv), ranks), device)
        return {"frames": result["frames"], "size": [result["width"], result["height"]],
                "seconds": seconds - result["load_seconds"],
                "load_seconds": result["load_seconds"],
                "peak_vram_bytes": torch.cuda.max_memory_allocated() if cuda else None}

    policy = RepeatPolicy(**config["policy"])
    upscale(config["steps"][0])  # warm-up: kernel choice, lazy initialisation, file caches
    runs = repeat_until_settled({str(steps): (lambda steps=steps: upscale(steps)) for steps in config["steps"]},
                                policy, {"seconds": "min"})
    timings = summarize_records(runs, {"seconds": "min"}, policy.spread_limit)
    summary = {}
    for steps, repeats in runs.items():
        seconds = timings[steps]["seconds"]
        vram = [r["peak_vram_bytes"] for r in repeats if r["peak_vram_bytes"] is not None]
        summary[steps] = {"fps": round(repeats[0]["frames"] / seconds["value"], 3), "seconds": seconds,
                          "peak_vram_gib": round(max(vram) / 2 ** 30, 2) if vram else None}
    return {"runs": runs, "summary": summary, "device": str(device), "policy": policy.to_dict(),
            "models": "stand-ins" if models == ["--stand-ins"] else [Path(m).name for m in models[1::2]]}


def _measure(args, name, clip, scale, dit=None, vae=None):
    config = {"input": str(clip), "scale": scale, "steps": [int(s) for s in args.e2e_steps.split(",")],
              "policy": repeat_policy(args).to_dict(), "scratch": str(args.scratch), "dit": dit and str(dit),
              "vae": vae and str(vae)}
    run = run_worker(name, config, args.scratch / f"{name}.log", timeout=args.timeout)
    first = run["runs"][str(config["steps"][0])][0]
    frames, size = first["frames"], first["size"]
    run.update(verdict(s["seconds"] for s in run["summary"].values()))
    print("\n" + table(["steps", "frames", "output", "fastest s", "spread", "fps", "peak VRAM GiB"],
                       [[steps, frames, f"{size[0]}x{size[1]}", round(s["seconds"]["value"], 3), s["seconds"]["spread"],
                         s["fps"], s["peak_vram_gib"] if s["peak_vram_gib"] is not None else "-"]
                        for steps, s in run["summary"].items()]), flush=True)
    ok = all(r["frames"] == frames for repeats in run["runs"].values() for r in repeats)
    return {"input": str(clip.relative_to(REPO)), "scale": scale, **run}, ok


def published_fps(result):
    """Frames per second per step count, each published only where its timing is stable."""
    summary = result["summary"]
    return publish({steps: s["fps"] for steps, s in summary.items()},
                   {steps: verdict([s["seconds"]]) for steps, s in summary.items()})


@section("e2e")
def e2e_section(args):
    width, height = (int(v) for v in args.e2e_size.split("x"))
    clip = synth_clip(args.e2e_frames, width, height)
    print(f"\n[bench e2e] tiny stand-ins, {args.e2e_frames} frames {width}x{height} -> 4x, steps {args.e2e_steps}, "
          f"{repeat_policy(args).describe()}", flush=True)
    result, ok = _measure(args, "e2e", clip, 4)
    result["what"] = ("frames / fastest repeat's seconds of tools/upscale.py's run with tiny random-weight stand-ins, "
                      "model loading excluded: the pipeline's overhead, not a real model's speed")
    return result, ok, {"e2e": {"fps": published_fps(result)}}


@section("gpu")
def gpu_section(args):
    """Real weights on a GPU: absolute FPS and peak VRAM at 1080p output."""
    import torch

    from tools import demo

    reason = None
    if not torch.cuda.is_available():
        reason = "no CUDA device here (torch.cuda.is_available() is False)"
    elif not args.models_dir:
        reason = "no MODELS_DIR given (make bench MODELS_DIR=... with the real Wan2.1-1.3B files)"
    else:
        try:
            dit, vae = demo.model_files(args.models_dir).values()
        except FileNotFoundError as missing:
            reason = str(missing)
    if reason:
        print(f"\n[bench gpu] SKIPPED: {reason}", flush=True)
        return {"skipped": reason}, True, {"gpu": {"skipped": reason}}
    # The pack's scales are integers: 480x270 at 4x gives 1920x1080 (480p -> 1080p is 2.25x).
    clip = synth_clip(args.gpu_frames, 480, 270)
    print(f"\n[bench gpu] {torch.cuda.get_device_name(0)}: {args.gpu_frames} frames 480x270 -> 1920x1080", flush=True)
    result, ok = _measure(args, "e2e", clip, 4, dit, vae)
    return result, ok, {"gpu": {"fps": published_fps(result),
                                "peak_vram_gib": {steps: s["peak_vram_gib"] for steps, s in result["summary"].items()}}}
