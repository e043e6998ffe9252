"""The pack under ComfyUI's Dynamic VRAM on one CUDA GPU: what `make gpu-check` (tools/gpu_check.sh) runs.

ComfyUI >= 0.16 loads models on NVIDIA GPUs through Dynamic VRAM (`ModelPatcherDynamic`, comfy-aimdo: weights in
lazily streamed virtual buffers). `--cpu` turns it off and a CPU load device gets a plain ModelPatcher, so no CPU
test reaches it. This runs three steps, each on a fresh headless server started with ComfyUI's default flags
(tools/comfy_server.py adds --cpu only without CUDA) and checks its log says Dynamic VRAM is on:

  a. the upscale example (example_workflows/api/litevsr_upscale_api.json) on a real clip, bigbuckbunny 33 frames
  b. the training example (litevsr_train_api.json): 20 adapter steps, checkpoints and a saved adapter
  c. the long-video example (streaming node, file to file) on a 300-frame clip: exactly 300 frames out at scale x

with random weights at the real Wan2.1-1.3B geometry (its release in the backbone registry, built as the bench
builds it: bench/overhead.py GEOMETRIES + tools/tiny_models.py) saved in fp16 as the released file is, and a Wan2.1
VAE at its real width (96). Weights are random: the check is about loading, memory and the code paths, not about
quality. Sizes are small so the whole run stays under 10 minutes on one H200: 160x96 input at scale 4
(640x384 out), the training example's 17-frame 256x256 crops.

    python -m tools.gpu_check [--geometry wan2.1-1.3B] [--size 160x96] [--scale 4] [--steps 2] [--frames 33]
                              [--train-steps 20] [--stream-frames 300] [--work-dir DIR] [--allow-cpu]

Run it through tools/gpu_check.sh, which builds or reuses the ComfyUI 0.33.0 environment and sets COMFYUI_PATH.
Without CUDA it prints one "[gpu_check] no CUDA, skipped: ..." line and exits 0, before building anything.
`--allow-cpu --geometry tiny` runs the same steps on the CPU with tiny stand-ins (Dynamic VRAM is then off): a check
of this script, not of the GPU path. Exit status: 0 when every step passed, 1 otherwise.
"""
import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter
from pathlib import Path

from bench.harness import table
from bench.overhead import GEOMETRIES, weight_count
from bench.stream import synth_clip, video_facts
from tools import comfy_server, demo
from tools.test_matrix import comfy_version

TAG = "[gpu_check]"
VAE_DIM = {"wan2.1-1.3B": 96, "tiny": 8}  # Wan2.1 VAE base width: the released one, and the tests' stand-in
DYNAMIC_VRAM_SINCE = (0, 16)
DYNAMIC_ON = "DynamicVRAM support detected and enabled"  # ComfyUI's start-up log line (main.py)
DYNAMIC_LOAD = re.compile(r"Model (\w+) prepared for dynamic VRAM loading")  # ModelPatcherDynamic.load
# the streaming node's plan lines; ComfyUI 0.33 prefixes log lines with a coloured level tag
PLAN_LINE = re.compile(r"(LiteVSR memory plan: .*|LiteVSR: (?!chunk ).*)")
TRAIN_API = demo.EXAMPLES / "api" / "litevsr_train_api.json"
TRAIN_CLIP = (48, 480, 272)  # frames, width, height of the HR training clip: larger than the example's 256 crop
RUN_NAME = "gpu_check"
NODE_TIMES_SHOWN = 4
VRAM_SOURCE_NOTE = ("peak VRAM = device-wide used GPU memory above the level just before the step's server started, "
                    "sampled every 100 ms ({source}): includes the CUDA context, torch's cached blocks and "
                    "comfy-aimdo's buffers (torch.cuda.max_memory_allocated would miss those; the server is another "
                    "process), and anything else using that GPU meanwhile")


def say(message):
    print(f"{TAG} {message}", flush=True)


def default_work_dir():
    cache = os.environ.get("LITEVSR_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache",
                                                     "comfyui-litevsr")
    return Path(cache) / "gpu-check"


def size_arg(text):
    width, _, height = text.lower().partition("x")
    return int(width), int(height or width)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--geometry", choices=sorted(VAE_DIM), default="wan2.1-1.3B",
                    help="stand-in DiT geometry (bench/overhead.py GEOMETRIES); tiny: for --allow-cpu")
    ap.add_argument("--size", type=size_arg, default=(160, 96), metavar="WxH", help="input size of steps a and c")
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2, help="sampling steps in steps a and c")
    ap.add_argument("--frames", type=int, default=33, help="frames of step a's clip")
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--train-crop", type=int, default=256, help="HR crop of the training example (square)")
    ap.add_argument("--train-clip-frames", type=int, default=17)
    ap.add_argument("--stream-frames", type=int, default=300, help="frames of step c's clip")
    ap.add_argument("--timeout", type=int, default=420, help="seconds each prompt may take")
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="models (reused between runs), the server's base directory and logs; default: "
                         "gpu-check/ in the environment cache")
    ap.add_argument("--allow-cpu", action="store_true",
                    help="run without CUDA (servers with --cpu, so Dynamic VRAM is off): checks this script only")
    args = ap.parse_args(argv)
    args.work_dir = (args.work_dir or default_work_dir()).resolve()
    return args


def cuda_or_reason():
    """None when CUDA is usable, else why not (one line)."""
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if available:
        return None
    why = f"torch {torch.__version__} ({sys.executable}) sees no CUDA device (torch.cuda.is_available() is False)"
    if caught:
        why += f": {comfy_server.one_line(caught[0].message, 200)}"
    return why


def comfy_facts():
    """(version tuple, version text, comfy-aimdo version or None) of the ComfyUI the servers run."""
    from importlib import metadata

    text = comfy_version(comfy_server.comfy_dir())
    version = tuple(int(part) for part in re.findall(r"\d+", text)[:3])
    try:
        aimdo = metadata.version("comfy-aimdo")
    except metadata.PackageNotFoundError:
        aimdo = None
    return version, text, aimdo


# --- peak VRAM of a server process ------------------------------------------------------------------------------

class VramMonitor:
    """Device-wide used memory, sampled every 100 ms from `start()` to `stop()`; `stop()` returns the peak above the
    first sample in bytes (None without a GPU). nvidia-smi's loop mode (no CUDA context in this process), else
    torch.cuda.mem_get_info polled in a thread (this process then holds a small CUDA context, counted in the
    baseline)."""

    def __init__(self, gpu):
        self.gpu = gpu  # None: no GPU (CPU smoke run)
        self.samples = []
        self.source = None
        self._proc = None
        self._done = threading.Event()
        self._thread = None

    def _read_smi(self):
        for line in self._proc.stdout:
            try:
                self.samples.append(int(line.strip()) * 2 ** 20)  # MiB
            except ValueError:
                pass

    def _poll_torch(self):
        import torch

        while not self._done.is_set():
            free, total = torch.cuda.mem_get_info(0)
            self.samples.append(total - free)
            self._done.wait(0.1)

    def _first_sample(self, seconds):
        deadline = time.monotonic() + seconds
        while not self.samples and time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                break  # nvidia-smi refused the GPU id (a MIG slice, say) or failed
            time.sleep(0.02)
        return bool(self.samples)

    def start(self):
        if self.gpu is None:
            return self
        if shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(["nvidia-smi", f"--id={self.gpu}", "--query-gpu=memory.used",
                                           "--format=csv,noheader,nounits", "-lms", "100"],
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._thread = threading.Thread(target=self._read_smi, daemon=True)
            self._thread.start()
            if self._first_sample(10):
                self.source = f"nvidia-smi --id={self.gpu} memory.used"
                return self
            self._stop_smi()
        self._thread = threading.Thread(target=self._poll_torch, daemon=True)
        self._thread.start()
        if self._first_sample(30):
            self.source = "torch.cuda.mem_get_info, device-wide"
        return self

    def _stop_smi(self):
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def stop(self):
        self._done.set()
        self._stop_smi()
        if self._thread is not None:
            self._thread.join(5)
        if not self.samples:
            return None
        return max(self.samples) - self.samples[0]


def gpu_id():
    """The GPU the servers use (CUDA device 0) as nvidia-smi names it: its UUID, else its visible index."""
    import torch

    try:
        uuid = str(torch.cuda.get_device_properties(0).uuid)
        if uuid:
            return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
    except (AttributeError, RuntimeError):
        pass
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return visible or "0"


# --- models, inputs ---------------------------------------------------------------------------------------------

def build_models(ctx):
    """The stand-in DiT (fp16, like the released wan2.1_t2v_1.3B_fp16.safetensors) and VAE under the examples' model
    names in base/models; reused when a previous run built the same ones (a stamp written after both files)."""
    models = ctx.base / "models"
    dit = models / "diffusion_models" / demo.DIT_NAME
    vae = models / "vae" / demo.VAE_NAME
    stamp = models / "gpu_check_models.json"
    geometry = GEOMETRIES[ctx.args.geometry]
    want = {"geometry": ctx.args.geometry, **geometry, "vae_dim": VAE_DIM[ctx.args.geometry], "dit_dtype": "float16",
            "seed": 0}
    params = weight_count(**geometry)
    what = (f"DiT {ctx.args.geometry} (dim {geometry['dim']}, {geometry['num_layers']} blocks, "
            f"{geometry['dim'] // 128} heads, FFN {geometry['ffn_dim']}, {params / 1e9:.2f} B params, fp16) + "
            f"Wan2.1 VAE dim {want['vae_dim']}, random weights")
    try:
        if json.loads(stamp.read_text()) == want and dit.is_file() and vae.is_file():
            say(f"models: {what}: reused from {models}")
            return
    except (OSError, ValueError):
        pass
    stamp.unlink(missing_ok=True)
    started = time.monotonic()
    import torch
    from safetensors.torch import save_file

    from tools import tiny_models

    dit.parent.mkdir(parents=True, exist_ok=True)
    vae.parent.mkdir(parents=True, exist_ok=True)
    state = tiny_models.tiny_wan_dit_state_dict(**geometry)
    for key in list(state):  # one tensor at a time: the fp32 and fp16 copies never exist whole together
        state[key] = state[key].to(torch.float16)
    save_file(state, str(dit))
    del state
    tiny_models.save_tiny_wan21_vae(vae, dim=want["vae_dim"])
    stamp.write_text(json.dumps(want))
    say(f"models: {what}: built in {time.monotonic() - started:.0f} s ({dit.stat().st_size / 2 ** 30:.2f} GiB DiT)")


def node_times(prompt, seconds):
    slow = sorted(((t, prompt[n]["class_type"]) for n, t in seconds.items() if n in prompt), reverse=True)
    return ", ".join(f"{cls} {t:.1f} s" for t, cls in slow[:NODE_TIMES_SHOWN])


def output_video(paths):
    videos = [p for p in paths if p.suffix.lower() in (".mp4", ".webm", ".mkv", ".mov")]
    if len(videos) != 1 or not videos[0].is_file():
        raise RuntimeError(f"expected one saved video, the graph reported {[str(p) for p in paths]}")
    return videos[0]


def check_video(path, frames, width, height, problems):
    facts = video_facts(path)
    if facts["frames"] != frames:
        problems.append(f"{facts['frames']} frames out, {frames} expected")
    if (facts["width"], facts["height"]) != (width, height):
        problems.append(f"{facts['width']}x{facts['height']} out, {width}x{height} expected")
    if len(facts["audio"]) != 1:
        problems.append(f"{len(facts['audio'])} audio streams out, 1 expected (the input's)")
    return facts


# --- steps ------------------------------------------------------------------------------------------------------

class Context:
    def __init__(self, args, cpu, gpu, version):
        self.args, self.cpu, self.gpu, self.version = args, cpu, gpu, version
        self.base = args.work_dir / "base"
        self.logs = args.work_dir / "logs"
        self.source = None  # where the peak VRAM figures come from


def fresh_dirs(ctx):
    """This run's inputs, outputs, logs and adapters go; the models stay (rebuilding them takes a while)."""
    for sub in ("input", "output", "temp", "user", "models/litevsr"):
        shutil.rmtree(ctx.base / sub, ignore_errors=True)
    shutil.rmtree(ctx.logs, ignore_errors=True)
    comfy_server.prepare_base(ctx.base)
    ctx.logs.mkdir(parents=True, exist_ok=True)


def upscale_step(ctx):
    """a. The upscale example on the first frames of bigbuckbunny (with audio)."""
    args = ctx.args
    width, height = args.size
    name = "gpu_check_clip.mp4"
    demo.make_clip(demo.bigbuckbunny(), ctx.base / "input" / name, args.frames, width, height)
    prompt = demo.configure(demo.load_api_workflow(), input_name=name, scale=args.scale, steps=args.steps,
                            adapter=demo.NEW_ADAPTER, filename_prefix="gpu_check/upscale",
                            workflow_name=demo.API_WORKFLOW.name)

    return video_run(prompt, args.frames, width, height, args)


def video_run(prompt, frames, width, height, args):
    """A step's run: the prompt through the server, its one video checked (frames, scale x size, audio); the
    streaming node's plan lines, if any, are kept as notes."""
    def run(server):
        started = time.monotonic()
        paths = server.run_prompt(prompt, timeout=args.timeout)
        seconds = time.monotonic() - started
        problems = []
        check_video(output_video(paths), frames, args.scale * width, args.scale * height, problems)
        plan = PLAN_LINE.findall(server.log_tail(400))  # the plan and the chunking the streaming node chose
        return {"prompt_s": seconds, "fps": frames / seconds, "problems": problems,
                "notes": plan + [f"node times: {node_times(prompt, server.node_seconds)}"]}

    return run


def train_step(ctx):
    """b. The training example: Video Dataset -> Degradation -> Train Adapter -> Save Adapter, Plot Loss Graph."""
    args = ctx.args
    frames, width, height = TRAIN_CLIP
    prompt = json.loads(TRAIN_API.read_text())
    by_class = {node["class_type"]: (key, node) for key, node in prompt.items()}
    _, dataset = by_class["LiteVSRVideoDataset"]
    frames = max(frames, args.train_clip_frames)
    (ctx.base / "input" / dataset["inputs"]["folder"]).mkdir(parents=True, exist_ok=True)
    demo.make_clip(demo.bigbuckbunny(), ctx.base / "input" / dataset["inputs"]["folder"] / "bbb.mp4", frames,
                   max(width, args.train_crop), max(height, args.train_crop))
    dataset["inputs"].update(clip_frames=args.train_clip_frames, width=args.train_crop, height=args.train_crop)
    train_id, train = by_class["LiteVSRTrainAdapter"]
    every = max(1, args.train_steps // 2)  # a checkpoint and a validation halfway, as well as at the end
    train["inputs"].update(steps=args.train_steps, checkpoint_every=every, validation_every=every,
                           run_name=RUN_NAME, resume=False)
    by_class["LiteVSRSaveAdapter"][1]["inputs"]["filename_prefix"] = "gpu_check_adapter"
    preview_id = by_class["PreviewAny"][0]

    def run(server):
        from safetensors import safe_open

        from comfyui_litevsr.nodes.core.adapter_file import read_adapter_config
        from comfyui_litevsr.nodes.core.checkpoint import checkpoint_paths
        from comfyui_litevsr.nodes.extension_paths import TRAINING_OUTPUT

        progress = []
        started = time.monotonic()
        server.run_prompt(prompt, timeout=args.timeout,
                          on_progress=lambda line: progress.append(line) if line.startswith(f"node {train_id}: ")
                          else None)
        seconds = time.monotonic() - started
        entry = next(iter(server.get("/history?max_items=1").values()))
        problems = []
        (name,) = entry["outputs"][preview_id]["text"]
        _, metadata = read_adapter_config(str(server.base / "models" / "litevsr" / name))
        if metadata.get("train_steps") != str(args.train_steps):
            problems.append(f"saved adapter {name} records {metadata.get('train_steps')} steps")
        state = checkpoint_paths(server.base / "output" / TRAINING_OUTPUT / RUN_NAME, args.train_steps)[1]
        with safe_open(str(state), "pt") as handle:
            losses = handle.get_tensor("losses").tolist()
        if len(losses) != args.train_steps or not all(math.isfinite(v) for v in losses):
            problems.append(f"losses in {state.name}: {losses}")
        final = f"{args.train_steps}/{args.train_steps}"
        if not any(line.endswith(f": {final}") for line in progress):
            problems.append(f"the train node's progress never reached {final}: {progress[-3:]}")
        train_s = server.node_seconds.get(train_id, seconds)
        return {"prompt_s": seconds, "rate": f"{args.train_steps / train_s:.2f} steps/s", "problems": problems,
                "notes": [f"losses {losses[0]:.3f} -> {losses[-1]:.3f}; saved {name}" if losses else f"saved {name}",
                          f"node times: {node_times(prompt, server.node_seconds)}"]}

    return run


def stream_step(ctx):
    """c. The long-video example (streaming node, file to file) on a ping-pong bigbuckbunny clip with audio."""
    args = ctx.args
    width, height = args.size
    name = f"gpu_check_{args.stream_frames}f.mp4"
    comfy_server.place_file(synth_clip(args.stream_frames, width, height), ctx.base / "input" / name)
    prompt = demo.configure(demo.load_api_workflow(stream=True), input_name=name, scale=args.scale,
                            steps=args.steps, adapter=demo.NEW_ADAPTER, filename_prefix="gpu_check/stream",
                            workflow_name=demo.STREAM_API_WORKFLOW.name)

    return video_run(prompt, args.stream_frames, width, height, args)


def dynamic_vram(ctx, log_text):
    """(state text, problem or None) from a server log."""
    if ctx.cpu:
        return "off (--cpu)", None
    loads = Counter(DYNAMIC_LOAD.findall(log_text))
    if DYNAMIC_ON in log_text:
        loaded = ", ".join(f"{cls} x{n}" for cls, n in sorted(loads.items())) or "none logged"
        return f"on (dynamic loads: {loaded})", None
    if ctx.version < DYNAMIC_VRAM_SINCE:
        return "n/a (this ComfyUI predates it)", None
    why = next((line.strip() for line in log_text.splitlines() if "DynamicVRAM" in line or "dynamic vram" in line),
               "no line saying it was enabled")
    return "OFF", f"Dynamic VRAM is not on: {comfy_server.one_line(why, 200)}"


def run_step(ctx, key, title, prepare):
    """Prepares the step's inputs, then runs it on a fresh server with the VRAM monitor; returns the summary row."""
    say(f"{key}. {title}")
    row = {"step": f"{key}. {title}", "result": "FAIL", "wall": None, "rate": "-", "vram": "-"}
    started = time.monotonic()
    problems, notes = [], []
    server = None
    try:
        run = prepare(ctx)
        monitor = VramMonitor(ctx.gpu).start()
        ctx.source = ctx.source or monitor.source
        server = comfy_server.ComfyServer(ctx.base, log_path=ctx.logs / f"{key}.log", cpu=ctx.cpu)
        try:
            begin = time.monotonic()
            server.start()
            notes.append(f"server up in {time.monotonic() - begin:.1f} s")
            outcome = run(server)
        finally:
            server.stop()
            peak = monitor.stop()
        problems += outcome["problems"]
        notes = [f"{notes[0]}, prompt {outcome['prompt_s']:.1f} s (models loaded from disk included)"] + \
            outcome["notes"]
        row["rate"] = outcome.get("rate") or f"{outcome['fps']:.2f} fps"
        if peak is not None:
            row["vram"] = f"{peak / 2 ** 30:.2f} GiB"
    except Exception as error:  # the step fails with one line; the next one still runs
        problems.append(comfy_server.one_line(f"{type(error).__name__}: {error}"))
    if server is not None:
        state, problem = dynamic_vram(ctx, server.log_tail(100000))
        notes.insert(0, f"Dynamic VRAM {state}")
        if problem:
            problems.append(problem)
    row["wall"] = f"{time.monotonic() - started:.1f}"
    row["result"] = "FAIL" if problems else "pass"
    for note in notes:
        say(f"   {note}")
    for problem in problems:
        say(f"   FAIL: {problem}")
    if server is not None:
        say(f"   log: {server.log_path}")
    say(f"{key}. {row['result']}: wall {row['wall']} s, {row['rate']}, peak VRAM {row['vram']}")
    return row


def main(argv=None):
    args = parse_args(argv)
    reason = cuda_or_reason()
    if reason and not args.allow_cpu:
        say(f"no CUDA, skipped: {reason}")
        return 0
    started = time.monotonic()
    cpu = reason is not None
    version, version_text, aimdo = comfy_facts()
    from tools import comfy_env

    comfy_env.setup(cpu=True)  # ComfyUI in this process only builds models on the CPU: it must not claim the GPU
    import torch

    if cpu:
        device = "CPU (--allow-cpu: servers run with --cpu, so Dynamic VRAM is off; this checks the script only)"
        gpu = None
    else:
        props = torch.cuda.get_device_properties(0)
        device = f"{props.name}, {props.total_memory / 2 ** 30:.0f} GiB"
        gpu = gpu_id()
    say(f"ComfyUI {version_text} ({comfy_server.comfy_dir()}), comfy-aimdo {aimdo or 'not installed'}, "
        f"torch {torch.__version__}, {device}")
    say(f"servers start with ComfyUI's default flags{' plus --cpu' if cpu else ' (no --cpu, so Dynamic VRAM applies)'}; "
        f"work dir {args.work_dir}")
    ctx = Context(args, cpu, gpu, version)
    fresh_dirs(ctx)
    build_models(ctx)
    width, height = args.size
    out = f"{args.scale * width}x{args.scale * height}"
    rows = [
        run_step(ctx, "a", f"upscale example, {args.frames} frames {width}x{height} -> {out}, {args.steps} steps",
                 upscale_step),
        run_step(ctx, "b", f"training example, {args.train_steps} steps, {args.train_clip_frames}-frame "
                           f"{args.train_crop}x{args.train_crop} crops", train_step),
        run_step(ctx, "c", f"streaming node, {args.stream_frames} frames {width}x{height} -> {out}, file to file",
                 stream_step),
    ]
    failed = [row for row in rows if row["result"] != "pass"]
    say(f"summary, ComfyUI {version_text}, {device}, {time.monotonic() - started:.0f} s in all:")
    print(table(["step", "result", "wall s", "speed", "peak VRAM"],
                [[r["step"], r["result"], r["wall"], r["rate"], r["vram"]] for r in rows]), flush=True)
    say("fps = output frames / the prompt's wall time (loading the models from disk included); steps/s = training "
        "steps / the train node's time")
    if ctx.source:
        say(VRAM_SOURCE_NOTE.format(source=ctx.source))
    say(f"{len(rows) - len(failed)}/{len(rows)} passed" + (": FAILED" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
