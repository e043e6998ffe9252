"""`make bench`: the pack's benchmarks, one section each, all written into bench/results/latest.json.

    python bench/run.py [--full] [--sections decode,...] [--out bench/results/latest.json] [--readme]

The JSON holds the command, the git commit, the machine (CPU model, cores, RAM, torch, GPU) and the time of this
run; each section's full result under "sections" (with the command, commit and time it was measured at), and the
headline figures the README prints as top-level keys (adapter_overhead, adapter_params_share, decode, stream, e2e,
gpu). A run of some sections keeps the other sections of an existing file. Every figure is a median of repeats
taken in one worker process. PNG plots go next to the JSON; `--readme` rewrites README.md's performance table from
the JSON (tests/test_bench.py checks that they agree).

Sections
  adapter_overhead  step time of direct / shared_blocks injection over the bare DiT's at Wan2.1-1.3B geometry
                    (and Wan2.2-5B where the host memory allows), and the adapter's share of the parameters
  decode            peak memory above baseline, time and max |diff| of the pack's tiled decode (4x4 tiles), an
                    untiled decode and ComfyUI's VAEDecodeTiled, tiny VAE, 960x960 output
  stream            whole-run peak RSS of tools/upscale.py for 150 vs 600 frames (memory must not grow with length)
  e2e               output frames per second of whole file-to-file runs, tiny stand-ins, 1/2/4 steps
  gpu               the same with real weights from MODELS_DIR at 1080p and peak VRAM; skipped without CUDA
"""
import argparse
import datetime
import importlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from harness import REPO, SECTIONS, git_commit, machine, serve_worker  # noqa: E402

for _module in ("overhead", "decode", "stream", "e2e"):  # each registers its sections and workers
    importlib.import_module(_module)

DEFAULT_OUT = REPO / "bench" / "results" / "latest.json"
README = REPO / "README.md"
README_BEGIN, README_END = "<!-- bench:begin -->", "<!-- bench:end -->"

QUICK = {"repeats": 3, "decode_frames": 5, "stream_size": "80x34"}
# 69 frames = 18 latent frames: ComfyUI's VAEDecodeTiled then needs a second 64-frame temporal tile
FULL = {"repeats": 5, "decode_frames": 69, "stream_size": "160x68"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="LiteVSR benchmarks -> bench/results/latest.json")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of: {', '.join(SECTIONS)}")
    ap.add_argument("--full", action="store_true",
                    help=f"the full sizes ({FULL}) instead of the quick ones ({QUICK}); about two hours on 2 CPU "
                         "cores, most of it the 160x68 streaming runs and the 69-frame decodes")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--readme", action="store_true", help="rewrite README.md's performance table from the JSON")
    ap.add_argument("--keep", action="store_true", help="keep outputs and logs in bench/.cache/outputs")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per measured process")
    ap.add_argument("--models-dir", default="", help="real weights for the gpu section (ComfyUI models layout)")
    ap.add_argument("--repeats", type=int, help="timed repeats per figure (after one warm-up)")
    ap.add_argument("--overhead-geometries", default="wan2.1-1.3B,wan2.2-5B")
    ap.add_argument("--overhead-latent", default="2x16x16",
                    help="latent frames x height x width of the timed step (2x16x16: 128 tokens, seconds per step)")
    ap.add_argument("--decode-px", type=int, default=960, help="square output side of the decode benchmark")
    ap.add_argument("--decode-frames", type=int)
    ap.add_argument("--stream-frames", default="150,600")
    ap.add_argument("--stream-size", help="input width x height (quick 80x34, full 160x68)")
    ap.add_argument("--stream-scale", type=int, default=4)
    ap.add_argument("--stream-steps", type=int, default=1)
    ap.add_argument("--stream-chunk-frames", type=int, default=33)
    ap.add_argument("--stream-overlap-frames", type=int, default=8)
    ap.add_argument("--stream-rss-target", type=float, default=1.2)
    ap.add_argument("--e2e-frames", type=int, default=17)
    ap.add_argument("--e2e-size", default="80x48")
    ap.add_argument("--e2e-steps", default="1,2,4")
    ap.add_argument("--gpu-frames", type=int, default=33)
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # the child side of harness.run_worker
    ap.add_argument("--worker-config", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for name, value in (FULL if args.full else QUICK).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    wanted = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in SECTIONS]
    if unknown:
        ap.error(f"unknown sections {unknown}; known: {list(SECTIONS)}")
    args.sections = wanted
    return args


# --- the figures: README table and plots ------------------------------------------------------------------------

def headline(results):
    """Top-level keys of latest.json: every kept section's headline figures."""
    merged = {}
    for result in results["sections"].values():
        merged.update(result.get("headline", {}))
    return merged


def _geometry_text(section):
    run = section["runs"][section["headline"]["adapter_overhead"]["geometry"]]
    return (f"{run['geometry']} geometry (dim {run['dim']}, {run['num_layers']} blocks), random {run['dtype']} "
            f"weights, {run['tokens']} tokens + {run['text_tokens']} text tokens")


def readme_table(results):
    """The README's performance table: every headline figure, what it measures, and the commit it was measured at."""
    sections = results["sections"]
    rows = []  # (section, figure, value, what)
    if "adapter_overhead" in sections:
        head, text = sections["adapter_overhead"]["headline"], _geometry_text(sections["adapter_overhead"])
        overhead_ = head["adapter_overhead"]
        share = head["adapter_params_share"]
        rows += [("adapter_overhead", "`adapter_overhead.direct`", f"{overhead_['direct']:.2f}×",
                  f"DiT step time ÷ bare backbone, {text}"),
                 ("adapter_overhead", "`adapter_overhead.shared_blocks`", f"{overhead_['shared_blocks']:.2f}×",
                  "same, shared_blocks"),
                 ("adapter_overhead", "`adapter_params_share`",
                  f"{100 * share['direct']:.2f} % / {100 * share['shared_blocks']:.2f} %",
                  "adapter parameters ÷ backbone's (direct / shared_blocks)")]
        for name, reason in sections["adapter_overhead"].get("skipped", {}).items():
            rows.append(("adapter_overhead", f"({name})", "skipped", reason))
    if "decode" in sections:
        d = sections["decode"]
        size, seconds = f"{d['output'][2]}×{d['output'][1]}", d["median_seconds"]
        rows += [("decode", "`decode.tiled_rss_ratio`", f"{d['headline']['decode']['tiled_rss_ratio']:.2f}",
                  f"peak memory above baseline, pack's 4×4-tiled ÷ untiled decode, {d['output'][0]} frames at {size} "
                  f"(ComfyUI VAEDecodeTiled: {d['headline']['decode']['comfyui_tiled_rss_ratio']:.2f})"),
                 ("decode", "`decode.max_abs_diff`", f"{d['max_abs_diff']['pack_tiled']:.3f}",
                  f"vs untiled on 0..1 (ComfyUI VAEDecodeTiled: {d['max_abs_diff']['comfyui_tiled']:.3f}); time "
                  f"{seconds['pack_tiled']:.1f} s, untiled {seconds['untiled']:.1f} s, ComfyUI "
                  f"{seconds['comfyui_tiled']:.1f} s")]
    if "stream" in sections:
        s = sections["stream"]
        runs = {r["frames"]: r for r in s["runs"]}
        detail = ", ".join(f"{n} frames {runs[n]['peak_rss_mib']:.0f} MiB" for n in sorted(runs))
        rows.append(("stream", "`stream.rss_ratio_600_150`", f"{s['rss_ratio_600_150']:.2f}",
                     f"whole-run peak RSS, 600 ÷ 150 frames at {s['scale']}× from {s['input_size']} ({detail})"))
    if "e2e" in sections:
        fps = sections["e2e"]["headline"]["e2e"]["fps"]
        width, height = sections["e2e"]["runs"][next(iter(fps))][0]["size"]
        rows.append(("e2e", "`e2e.fps`", " / ".join(f"{fps[k]:.2f}" for k in fps),
                     f"output frames/s for {' / '.join(fps)} steps, tiny stand-ins, {width}×{height} output"))
    if "gpu" in sections:
        gpu = sections["gpu"]["headline"]["gpu"]
        rows.append(("gpu", "`gpu`", "skipped" if "skipped" in gpu else
                     " / ".join(f"{v['fps']:.2f} fps, {v['peak_vram_gib']} GiB" for v in gpu.values()),
                     gpu.get("skipped", "real Wan2.1-1.3B, 1080p output, per step count")))
    m = results["machine"]
    lines = [f"Measured on {m['cpu']} ({m['cores_usable']} cores, {m['ram_gib']} GiB, torch {m['torch']}, GPU: "
             f"{m['gpu'] or 'none'}); each section's command is in `bench/results/latest.json`.",
             "", "| figure | value | what | commit |", "|---|---|---|---|"]
    lines += [f"| {figure} | {value} | {what} | `{(sections[name].get('commit') or '?')[:8]}` |"
              for name, figure, value, what in rows]
    return "\n".join(lines)


def update_readme(results, path=README):
    text = path.read_text()
    begin, end = text.index(README_BEGIN) + len(README_BEGIN), text.index(README_END)
    path.write_text(text[:begin] + "\n" + readme_table(results) + "\n" + text[end:])


def plots(results, folder):
    """One PNG per measured section, next to the JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = results["sections"]
    figures = {}
    if "adapter_overhead" in sections:
        runs = sections["adapter_overhead"]["runs"]
        figures["adapter_overhead"] = ("DiT step time (median s)", {
            f"{geometry}\n{name}": run["median_step_seconds"][name]
            for geometry, run in runs.items() for name in ("bare", "direct", "shared_blocks")})
    if "decode" in sections:
        figures["decode"] = ("peak MiB above baseline", sections["decode"]["median_peak_mib"])
    if "stream" in sections:
        figures["stream"] = ("whole-run peak RSS (MiB)",
                             {f"{r['frames']} frames": r["peak_rss_mib"] for r in sections["stream"]["runs"]})
    if "e2e" in sections:
        figures["e2e"] = ("output frames per second",
                          {f"{steps} steps": fps for steps, fps in sections["e2e"]["headline"]["e2e"]["fps"].items()})
    for name, (ylabel, values) in figures.items():
        fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
        bars = ax.bar(list(values), list(values.values()), color="#4c72b0")
        ax.bar_label(bars, fmt="%.4g")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{name} ({sections[name]['commit'][:8] if sections[name].get('commit') else '?'})")
        ax.tick_params(axis="x", labelsize=8)
        fig.tight_layout()
        fig.savefig(folder / f"{name}.png")
        plt.close(fig)


# --- main -------------------------------------------------------------------------------------------------------

def write_json(results, out):
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        serve_worker(args.worker, args.worker_config)
        return 0
    out = Path(args.out)
    previous = {}
    if out.is_file():
        try:
            previous = json.loads(out.read_text()).get("sections", {})
        except (OSError, ValueError):
            previous = {}
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    commit = git_commit()
    command = " ".join([Path(sys.executable).name, *sys.argv])
    results = {"command": command, "git": commit, "machine": machine(), "timestamp": stamp,
               "sections": dict(previous)}
    all_ok = True
    with tempfile.TemporaryDirectory(prefix="litevsr-bench-") as scratch:
        args.scratch = Path(scratch)
        for name in args.sections:
            started = time.monotonic()
            result, ok, figures = SECTIONS[name](args)
            result.update(ok=ok, headline=figures, seconds=round(time.monotonic() - started, 1), measured_at=stamp,
                          commit=commit["commit"], command=command, machine=results["machine"])
            results["sections"][name] = result
            all_ok &= ok
            write_json({**{k: v for k, v in results.items() if k != "sections"}, **headline(results),
                        "sections": results["sections"]}, out)
    plots(results, out.parent)
    if args.readme:
        update_readme(results)
    print(f"\n[bench] wrote {out} and its plots" + ("" if all_ok else " (some checks FAILED)"), flush=True)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
