"""`make bench`: the pack's benchmarks, one section each, all written into bench/results/latest.json.

    python -m bench.run [--full] [--sections decode,...] [--out bench/results/latest.json] [--readme]
                        [--accept-unstable] [--load N]

The JSON holds the command, the git commit, the machine (CPU model, cores, RAM, torch, GPU) and the time of this
run; each section's full result under "sections" (with the command, commit and time it was measured at), and the
headline figures the README prints as top-level keys (adapter_overhead, adapter_params_share, decode, stream, e2e,
gpu). A run of some sections keeps the other sections of an existing file. PNG plots go next to the JSON;
`--readme` rewrites README.md's performance table from the JSON (tests/test_bench.py checks that they agree).

Timings are repeated in one worker process, interleaved, until the fastest repeats agree (harness.RepeatPolicy:
--repeats to --max-repeats rounds, --repeat-seconds at most); a time is the fastest repeat, memory the median.
Every measured set records its repeats, its spread and whether it is stable; a figure computed from an unstable
set is not published (null in the headline, its value under "unpublished", "unstable" in the README), and the run
says so in its last line and exits 1 unless --accept-unstable. `--load N` runs N busy processes alongside, to
see a section under deliberate interference (its results must go to another --out).

Sections
  adapter_overhead  step time of direct / shared_blocks injection over the bare DiT's at Wan2.1-1.3B geometry
                    (and Wan2.2-5B where the host memory allows), and the adapter's share of the parameters
  injection_modes   what direct and shared_blocks injection cost at the real Wan geometries (parameters, FLOPs and
                    activations of a sampling and a training step, analytic), and their measured time ratio on a
                    tiny stand-in (the default's grounds: README, "Which injection mode")
  decode            peak memory above baseline, time and max |diff| of the pack's tiled decode (4x4 tiles), an
                    untiled decode and ComfyUI's VAEDecodeTiled, width-8 VAE, 960x960 output; time and peak memory of
                    the full Wan2.1 VAE, the light VAE geometry and the tiny TAEHV decoder, 17 frames at 832x480; the
                    time of tiling the tiny decoder, 17 frames at 1280x720
  stream            whole-run peak RSS of tools/upscale.py for 150 vs 600 frames (memory must not grow with length)
  stream_infvsr     the same for InfVSR's causal stream (tools/upscale.py --infvsr)
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

from bench.decode import DECODERS_FRAMES, DECODERS_OUTPUT, TILED_TIME_FRAMES, TILED_TIME_OUTPUT
from bench.harness import (CONFIRM, REPO, SECTIONS, STABLE_SPREAD, busy_load, command_line, figures_of, git_commit,
                           machine, serve_worker)

for _module in ("overhead", "injection", "decode", "stream", "e2e"):  # each registers its sections and workers
    importlib.import_module(f"bench.{_module}")

DEFAULT_OUT = REPO / "bench" / "results" / "latest.json"
README = REPO / "README.md"
README_BEGIN, README_END = "<!-- bench:begin -->", "<!-- bench:end -->"

QUICK = {"repeats": 3, "max_repeats": 9, "decode_frames": 5, "stream_size": "80x34"}
# 69 frames = 18 latent frames: ComfyUI's VAEDecodeTiled then needs a second 64-frame temporal tile
FULL = {"repeats": 5, "max_repeats": 15, "decode_frames": 69, "stream_size": "160x68"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="LiteVSR benchmarks -> bench/results/latest.json")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of: {', '.join(SECTIONS)}")
    ap.add_argument("--full", action="store_true",
                    help=f"the full sizes ({FULL}) instead of the quick ones ({QUICK}); about three hours on 2 CPU "
                         "cores, most of it the 160x68 streaming runs and the 69-frame decodes")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--readme", action="store_true", help="rewrite README.md's performance table from the JSON")
    ap.add_argument("--keep", action="store_true", help="keep outputs and logs in bench/.cache/outputs")
    ap.add_argument("--timeout", type=float, default=7200,
                    help="seconds per measured process (the decoder comparison's full VAE alone takes about 40 "
                         "minutes on 2 CPU cores)")
    ap.add_argument("--models-dir", default="", help="real weights for the gpu section (ComfyUI models layout)")
    ap.add_argument("--repeats", type=int, help="timed repeats per figure at least (after one warm-up; quick 3, "
                                                    "full 5)")
    ap.add_argument("--max-repeats", type=int,
                    help="timed repeats at most, while the fastest three still disagree (quick 9, full 15)")
    ap.add_argument("--repeat-seconds", type=float, default=900,
                    help="no new round of repeats after this many seconds of one measured set")
    ap.add_argument("--spread-limit", type=float, default=STABLE_SPREAD,
                    help="stable: the fastest three repeats within this factor (memory: all repeats)")
    ap.add_argument("--accept-unstable", action="store_true",
                    help="exit 0 even if some timing stayed unstable (its figures are still withheld and marked)")
    ap.add_argument("--load", type=int, default=0, metavar="N",
                    help="run N busy processes (single-threaded matmul loops) alongside: deliberate interference; "
                         "needs an --out other than latest.json")
    ap.add_argument("--overhead-geometries", default="wan2.1-1.3B,wan2.2-5B")
    ap.add_argument("--overhead-latent", default="auto",
                    help="latent frames x height x width of the timed step; auto: the smallest of 2x16x16 (128 "
                         "tokens), 2x32x32, ... whose step is compute-bound on this machine")
    ap.add_argument("--decode-px", type=int, default=960, help="square output side of the decode benchmark")
    ap.add_argument("--decode-frames", type=int)
    ap.add_argument("--decoders-size", default="{}x{}".format(*DECODERS_OUTPUT),
                    help="output width x height of the full / light / tiny decoder comparison")
    ap.add_argument("--decoders-frames", type=int, default=DECODERS_FRAMES)
    ap.add_argument("--tiled-time-size", default="{}x{}".format(*TILED_TIME_OUTPUT),
                    help="output width x height of the tiny decoder's tiled-vs-untiled time")
    ap.add_argument("--tiled-time-frames", type=int, default=TILED_TIME_FRAMES)
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
    if args.max_repeats is None and args.repeats is not None:  # more repeats asked for: room for them to settle
        args.max_repeats = max(args.repeats, (FULL if args.full else QUICK)["max_repeats"])
    for name, value in (FULL if args.full else QUICK).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    wanted = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in SECTIONS]
    if unknown:
        ap.error(f"unknown sections {unknown}; known: {list(SECTIONS)}")
    args.sections = wanted
    if args.max_repeats < args.repeats or args.repeats < 1:
        ap.error(f"--max-repeats ({args.max_repeats}) must be at least --repeats ({args.repeats}), which is >= 1")
    if args.spread_limit < 1:
        ap.error("--spread-limit is a factor (largest / smallest repeat): 1 or more")
    if args.load and (Path(args.out).resolve() == DEFAULT_OUT.resolve() or args.readme):
        ap.error("a run under --load is disturbed on purpose: write it to another --out, without --readme")
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


def _values(figures, names, fmt):
    """A value cell: the published figures; a withheld one (unstable, or refused by its check) in parentheses,
    which is no headline."""
    return " / ".join(fmt(figures[name]) if figures[name] is not None else f"({fmt(figures['unpublished'][name])})"
                      for name in names)


def _trust(figures, names, plausible=None):
    """(spread, verdict) cells of published figures: the worst spread of their inputs and whether all are stable;
    sections measured before spreads were recorded say so."""
    if "stable" not in figures:
        return "—", "not recorded"
    spread = max(figures["spread"][name] for name in names)
    if not all(figures["stable"][name] for name in names):
        return f"{spread:.3f}", "**unstable**"
    if any((plausible or {}).get(name) is False for name in names):
        return f"{spread:.3f}", "**fails its FLOP check**"
    return f"{spread:.3f}", "stable"


def _timing_statistic(section):
    """How the section's times were taken: the fastest repeat, or (results from before the repeat policy) the
    median."""
    return "fastest repeat" if section.get("stable") is not None else "median of repeats"


def _overhead_rows(section):
    head, text = section["headline"], _geometry_text(section)
    ratios, run = head["adapter_overhead"], section["runs"][head["adapter_overhead"]["geometry"]]
    share = head["adapter_params_share"]

    def ratio_row(mode, what):
        if "expected_ratio" in run:
            what += f"; FLOPs predict {run['expected_ratio'][mode]:.2f}×"
        return (f"`adapter_overhead.{mode}`", _values(ratios, [mode], lambda v: f"{v:.2f}×"),
                *_trust(ratios, [mode], run.get("plausible")), what)

    rows = [ratio_row("direct", f"DiT step time ÷ bare backbone ({_timing_statistic(section)}), {text}"),
            ratio_row("shared_blocks", "same, shared_blocks")]
    if "flops_share" in ratios:
        shares, flops = ratios["flops_share"], run["flops_per_step"]
        names = list(figures_of(shares))
        probe = run["probes"]["matmul"]
        rows.append(("`adapter_overhead.flops_share`", _values(shares, names, lambda v: f"{100 * v:.0f} %"),
                     *_trust(shares, names),
                     f"achieved FLOP/s ÷ matmul peak of the same run ({' / '.join(names)}): "
                     f"{' / '.join(f'{flops[n] / 1e9:.4g}' for n in names)} GFLOP per step, peak "
                     f"{run['matmul_peak_flops_per_second'] / 1e9:.0f} GFLOP/s ([{probe['rows']}, {probe['width']}] × "
                     f"[{probe['width']}, {probe['width']}] {probe['dtype']}); {run['regime']}: {run['intensity']:.0f} "
                     f"FLOP per byte of weights, machine balance {run['machine_balance']:.0f}"))
    rows.append(("`adapter_params_share`", f"{100 * share['direct']:.2f} % / {100 * share['shared_blocks']:.2f} %",
                 "—", "exact", "adapter parameters ÷ backbone's (direct / shared_blocks)"))
    rows += [(f"({name})", "skipped", "—", "skipped", reason) for name, reason in section.get("skipped", {}).items()]
    return rows


def _injection_rows(section):
    """The injection modes' costs at Wan2.1-1.3B (analytic) and the stand-in's measured ratio."""
    costs = next(c for c in section["costs"] if c["release"] == section["headline"]["injection_modes"]["release"])
    direct, shared = costs["modes"]["direct"], costs["modes"]["shared_blocks"]
    stand_in, run = section["headline"]["injection_modes"]["stand_in"], section["stand_in"]
    names = list(figures_of(stand_in))
    frames, height, width = costs["sample_latent"]
    (clip_frames, clip_w, clip_h), (train_frames, train_h, train_w) = costs["sample_clip"], costs["train_clip"]
    return [("`injection_modes.step_flops`", f"{direct['step_vs_bare']:.2f}× / {shared['step_vs_bare']:.2f}×", "—",
             "analytic", f"DiT FLOPs of one sampling step ÷ bare backbone (direct / shared_blocks), "
             f"{costs['release']}, {frames}×{height}×{width} latent ({costs['sample_tokens']} tokens: 81 frames at "
             f"832×480); training step (17 frames, 256×256): {shared['train_flops_vs_direct']:.2f}× the FLOPs and "
             f"{shared['train_bytes_vs_direct']:.2f}× the activations of direct; memory.py's formulas"),
            ("`injection_modes.params_share`",
             f"{100 * direct['params_share']:.2f} % / {100 * shared['params_share']:.2f} %", "—", "exact",
             f"trainable ÷ backbone parameters, full rank (rank 64: {100 * direct['params_low_rank_share']:.2f} % / "
             f"{100 * shared['params_low_rank_share']:.2f} %), counted on the modules"),
            ("`injection_modes.stand_in`", _values(stand_in, names, lambda v: f"{v:.2f}×"), *_trust(stand_in, names),
             f"shared_blocks ÷ direct time (fastest repeat), {' / '.join(names)} step, tiny float32 stand-in "
             f"({run['tokens']} tokens); FLOPs predict {run['predicted_ratio']['forward']:.2f}× / "
             f"{run['predicted_ratio']['train']:.2f}×")]


def _decode_rows(d):
    head = d["headline"]["decode"]
    seconds = head.get("seconds") or d["median_seconds"]
    variants = ["pack_tiled", "untiled", "comfyui_tiled"]
    return [("`decode.tiled_rss_ratio`", _values(head, ["tiled_rss_ratio"], lambda v: f"{v:.2f}"),
             *_trust(head, ["tiled_rss_ratio"]),
             f"peak memory above baseline (median), pack's 4×4-tiled ÷ untiled decode, {_output_text(d)}, width-8 "
             f"VAE (ComfyUI VAEDecodeTiled: {_values(head, ['comfyui_tiled_rss_ratio'], lambda v: f'{v:.2f}')})"),
            ("`decode.max_abs_diff`", f"{d['max_abs_diff']['pack_tiled']:.3f}", "—", "deterministic",
             f"vs untiled on 0..1 (ComfyUI VAEDecodeTiled: {d['max_abs_diff']['comfyui_tiled']:.3f})"),
            ("`decode.seconds`", _values(seconds, variants, lambda v: f"{v:.1f} s"), *_trust(seconds, variants),
             f"one decode ({_timing_statistic(d)}): pack's tiled / untiled / ComfyUI VAEDecodeTiled; not tiling's "
             f"cost: a width-8 VAE on small tiles runs PyTorch's slow CPU conv3d (bench/decode.py)")
            ] + _decoder_rows(d)


def _target(d, figure):
    target = d["targets"][figure]
    relation = {">=": "≥", "<=": "≤"}[target["relation"]]
    return f"; target {relation} {target['bound']:g}: {'met' if target['met'] else '**missed**'}"


def _measured(run, names, unit):
    """'a s / b s (n repeats)' or 'a MiB / b MiB (n repeats)' of a comparison's variants."""
    values = run["seconds"] if unit == "s" else run["median_peak_mib"]
    repeats = min(len(run["summary"][name]["seconds"]["repeats"]) for name in names)
    return f"{' / '.join(f'{values[name]:.4g} {unit}' for name in names)} ({repeats} repeats)"


def _output_text(run):
    frames, height, width = run["output"][:3]
    return f"{frames} frames at {width}×{height}"


def _grid_text(tiled):
    return f"{tiled['grid'][0]}×{tiled['grid'][1]} tiles of {tiled['tile_px']} px, overlap {tiled['overlap_px']} px"


def _decoder_rows(d):
    """The full / light / tiny decoder comparison and the time of tiling the tiny decoder (absent from sections
    measured before them)."""
    if "decoders" not in d:
        return []
    head, decoders, tiled = d["headline"]["decode"], d["decoders"], d["tiled_time"]
    params, full_tiny, full_light = decoders["params_m"], ["full_vae", "tiny"], ["full_vae", "light_vae"]

    def row(figure, fmt, what):
        return (f"`decode.{figure}`", _values(head, [figure], fmt), *_trust(head, [figure]), what)

    times, ratio = (lambda v: f"{v:.2f}×"), (lambda v: f"{v:.2f}")
    return [row("tiny_speedup", times,
                f"decode time (fastest repeat), full Wan2.1 VAE (width {decoders['full_dim']}, {params['full_vae']} M "
                f"parameters) ÷ tiny TAEHV decoder ({params['tiny']} M, taew2_1's architecture), the same latent, "
                f"{_output_text(decoders)}, untiled through the pack's decode, random {decoders['dtype']['full_vae']} "
                f"weights: {_measured(decoders, full_tiny, 's')}{_target(d, 'tiny_speedup')}"),
            row("tiny_memory_ratio", ratio,
                f"peak memory above baseline (median), tiny ÷ full: {_measured(decoders, full_tiny[::-1], 'MiB')}"
                f"{_target(d, 'tiny_memory_ratio')}"),
            row("light_vae_speedup", times,
                f"the same, full ÷ light VAE geometry (Wan2.1 VAE at width {decoders['light_dim']}, "
                f"{params['light_vae']} M, for lightvaew2_1): {_measured(decoders, full_light, 's')}"),
            row("light_vae_memory_ratio", ratio,
                f"peak memory above baseline (median), light ÷ full: {_measured(decoders, full_light[::-1], 'MiB')}"),
            row("tiled_time_ratio", times,
                f"decode time (fastest repeat), tiny decoder through the pack's decode_tiled, {_grid_text(tiled)} ÷ "
                f"one tile, {_output_text(tiled)}: {_measured(tiled, ['tiled', 'untiled'], 's')}"
                f"{_target(d, 'tiled_time_ratio')}"),
            ("`decode.tiled_pixel_ratio`", f"{head['tiled_pixel_ratio']:.3f}", "—", "exact",
             f"pixels the {_grid_text(tiled)} decode ÷ the output's (no square tile splits 16:9 into 4×4)"),
            row("tiled_time_per_pixel_ratio", times,
                "time per decoded pixel, tiled ÷ untiled (time ratio ÷ pixel ratio): the cost of tiling beyond the "
                "extra pixels")]


def _stream_rows(s, name="stream", what=""):
    runs = {r["frames"]: r for r in s["runs"]}
    detail = ", ".join(f"{n} frames {runs[n]['peak_rss_mib']:.0f} MiB" for n in sorted(runs))
    return [(f"`{name}.rss_ratio_600_150`", f"{s['rss_ratio_600_150']:.2f}", "—", "one run per length",
             f"whole-run peak RSS{what}, 600 ÷ 150 frames at {s['scale']}× from {s['input_size']} ({detail})")]


def _fps_rows(section, figure, what):
    fps = section["headline"][figure]["fps"]
    names = list(figures_of(fps))
    return [(f"`{figure}.fps`", _values(fps, names, lambda v: f"{v:.2f}"), *_trust(fps, names),
             f"output frames/s ({_timing_statistic(section)}) for {' / '.join(names)} steps, {what}")]


def _e2e_rows(section):
    width, height = next(iter(section["runs"].values()))[0]["size"]
    return _fps_rows(section, "e2e", f"tiny stand-ins, {width}×{height} output")


def _gpu_rows(section):
    gpu = section["headline"]["gpu"]
    if "skipped" in gpu:
        return [("`gpu`", "skipped", "—", "skipped", gpu["skipped"])]
    vram = " / ".join(f"{v} GiB" for v in gpu["peak_vram_gib"].values())
    return _fps_rows(section, "gpu", f"real Wan2.1-1.3B, 1080p output, peak VRAM {vram}")


def readme_table(results):
    """The README's performance table: every headline figure, its spread and verdict, what it measures, and the
    commit it was measured at."""
    sections = results["sections"]
    row_makers = {"adapter_overhead": _overhead_rows, "injection_modes": _injection_rows, "decode": _decode_rows,
                  "stream": _stream_rows,
                  "stream_infvsr": lambda s: _stream_rows(s, "stream_infvsr", " of InfVSR's causal stream"),
                  "e2e": _e2e_rows, "gpu": _gpu_rows}
    m = results["machine"]
    lines = [f"Measured on {m['cpu']} ({m['cores_usable']} cores, {m['ram_gib']} GiB, torch {m['torch']}, GPU: "
             f"{m['gpu'] or 'none'}); each section's command is in `bench/results/latest.json`. Spread: largest ÷ "
             f"smallest of the repeats a figure rests on (times: the fastest three), unstable above its run's "
             f"limit (default {STABLE_SPREAD}); a figure in parentheses is withheld, not a headline.",
             "", "| figure | value | spread | verdict | what | commit |", "|---|---|---|---|---|---|"]
    for name, make_rows in row_makers.items():
        if name in sections:
            commit = (sections[name].get("commit") or "?")[:8]
            lines += [f"| {figure} | {value} | {spread} | {verdict} | {what} | `{commit}` |"
                      for figure, value, spread, verdict, what in make_rows(sections[name])]
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
        figures["adapter_overhead"] = [("DiT step time (fastest repeat, s)", {
            f"{geometry}\n{name}": (run["timings"][name]["value"] if "timings" in run  # older results: medians
                                    else run["median_step_seconds"][name])
            for geometry, run in runs.items() for name in ("bare", "direct", "shared_blocks")})]
    if "decode" in sections:
        decode = sections["decode"]
        figures["decode"] = [(f"peak MiB above baseline\nwidth-8 VAE, {_output_text(decode)}",
                              decode["median_peak_mib"])]
        if "decoders" in decode:
            decoders, tiled = decode["decoders"], decode["tiled_time"]
            figures["decode"] += [(f"decode s (fastest)\n{_output_text(decoders)}", decoders["seconds"]),
                                  (f"peak MiB above baseline\n{_output_text(decoders)}", decoders["median_peak_mib"]),
                                  (f"tiny decoder s (fastest)\n{_output_text(tiled)}", tiled["seconds"])]
    for name in ("stream", "stream_infvsr"):
        if name in sections:
            figures[name] = [("whole-run peak RSS (MiB)",
                              {f"{r['frames']} frames": r["peak_rss_mib"] for r in sections[name]["runs"]})]
    if "e2e" in sections:
        figures["e2e"] = [("output frames per second",
                           {f"{steps} steps": s["fps"] for steps, s in sections["e2e"]["summary"].items()})]
    for name, panels in figures.items():
        fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * (1 + (len(panels) - 1) / 2), 3.6), dpi=100,
                                 squeeze=False)
        for ax, (ylabel, values) in zip(axes[0], panels):
            bars = ax.bar(list(values), list(values.values()), color="#4c72b0")
            ax.bar_label(bars, fmt="%.4g")
            ax.set_ylabel(ylabel, fontsize=8 if len(panels) > 1 else None)
            ax.tick_params(axis="x", labelsize=8)
        unstable = ", UNSTABLE" if sections[name].get("stable") is False else ""
        fig.suptitle(f"{name} ({sections[name]['commit'][:8] if sections[name].get('commit') else '?'}{unstable})")
        fig.tight_layout()
        fig.savefig(folder / f"{name}.png")
        plt.close(fig)


# --- main -------------------------------------------------------------------------------------------------------

def write_json(results, out):
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out)


def _unstable_reason(spread, limit):
    return f"spread {spread} > {limit}" if spread > limit else f"fewer than {CONFIRM} repeats"


def closing_line(out, ran, accept_unstable, limit):
    """(the run's last line, its exit code) from the sections this run measured: failed checks exit 1, and so do
    unstable timings unless accepted; the line names both."""
    failed = [name for name, result in ran.items() if not result["ok"]]
    unstable = [f"{name} ({_unstable_reason(result['spread'], limit)})" for name, result in ran.items()
                if result.get("stable") is False]
    line = f"[bench] wrote {out} and its plots"
    if failed:
        line += f"; checks FAILED: {', '.join(failed)}"
    if unstable:
        line += f"; UNSTABLE, figures withheld: {', '.join(unstable)}"
        line += (" (accepted: --accept-unstable)" if accept_unstable else
                 "; rerun on a quiet machine, or pass --accept-unstable")
    elif any("stable" in result for result in ran.values()):
        line += f"; every timing stable (spread <= {limit})"
    return line, int(bool(failed) or (bool(unstable) and not accept_unstable))


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
    results = {"command": command_line(), "git": commit, "machine": machine(), "timestamp": stamp,
               "sections": dict(previous)}
    if args.load:
        results["load"] = {"busy_processes": args.load}
    ran = {}
    with tempfile.TemporaryDirectory(prefix="litevsr-bench-") as scratch, busy_load(args.load) as busy:
        if busy:
            print(f"[bench] deliberate load: {len(busy)} busy processes (pids {busy})", flush=True)
        args.scratch = Path(scratch)
        for name in args.sections:
            started = time.monotonic()
            result, ok, figures = SECTIONS[name](args)
            result.update(ok=ok, headline=figures, seconds=round(time.monotonic() - started, 1), measured_at=stamp,
                          commit=commit["commit"], command=results["command"], machine=results["machine"],
                          load=args.load)
            results["sections"][name] = ran[name] = result
            write_json({**{k: v for k, v in results.items() if k != "sections"}, **headline(results),
                        "sections": results["sections"]}, out)
    plots(results, out.parent)
    if args.readme:
        update_readme(results)
    line, code = closing_line(out, ran, args.accept_unstable, args.spread_limit)
    print("\n" + line, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
