"""Upscale a video file to a video file with the pack's core, in this process (no ComfyUI server).

    python tools/upscale.py --input in.mp4 --output out.mp4 --dit wan_dit.safetensors --vae wan_vae.safetensors \
        [--adapter adapter.safetensors] [--scale 4] [--steps 1] [--seed 0] [--chunk-frames 0] [--overlap-frames 8] \
        [--segment-chunks 0] [--cut-threshold 0.06] [--colour lab]
    python tools/upscale.py --input in.mp4 --output out.mp4 --stand-ins      # tiny random-weight models
    torchrun --nproc_per_node=K tools/upscale.py ... --segment-chunks N       # K processes share the video

The models are loaded exactly as ComfyUI's stock "Load Diffusion Model" and "Load VAE" nodes load them, the adapter
(a file, or a fresh zero-initialised one) is attached as "Attach State-Aware Adapter" attaches it, and the run is
the "Upscale Video File" node's (nodes/streaming.py): frames are read lazily, stitched and encoded as soon as they
are final, audio is copied, and the file appears under its final name only when complete.

Under torchrun (RANK / WORLD_SIZE set) every process loads the models, rank 0 plans (memory sizes, scene cuts) and
hands the plan to all, the ranks take contiguous chunk ranges cut on segment boundaries (`--segment-chunks`, where
the carried state restarts), ranks other than 0 hand their finished chunks to rank 0 through safetensors files in
an exchange folder next to the output, and rank 0 writes the file. The frames are the same for any number of
processes given the same --segment-chunks (a one-process run with that --segment-chunks included); the digest
printed at the end is that of the frames as encoded.
"""
import argparse
import datetime
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_server  # noqa: E402

STAND_IN_BANNER = ("NOTE: --stand-ins: tiny RANDOM-WEIGHT Wan stand-ins instead of real models. The output only "
                   "demonstrates the pipeline; it is not an upscale.")
EXCHANGE_SUFFIX = ".litevsr-exchange"
FAILED_MARK = "failed_rank"


class Ranks:
    """This process's place among torchrun's processes (rank 0 of 1 without torchrun)."""

    def __init__(self, environ=os.environ, tool="upscale"):
        self.tool = tool  # names this tool in printed lines
        self.rank = int(environ.get("RANK", 0))
        self.world = int(environ.get("WORLD_SIZE", 1))
        self.local_rank = int(environ.get("LOCAL_RANK", 0))
        self.local_world = int(environ.get("LOCAL_WORLD_SIZE", self.world))
        self.shared = self.world > 1

    def say(self, message, everyone=False):
        if self.rank == 0 or everyone:
            prefix = f"[{self.tool} rank {self.rank}/{self.world}]" if self.shared else f"[{self.tool}]"
            print(f"{prefix} {message}", flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="LiteVSR: upscale a video file headless (torchrun shares the chunks)")
    ap.add_argument("--input", required=True, help="LR video file")
    ap.add_argument("--output", required=True, help="output file (.mp4, .mkv, ...); written atomically")
    ap.add_argument("--dit", help="Wan DiT file (as for ComfyUI's Load Diffusion Model)")
    ap.add_argument("--vae", help="Wan VAE file (as for ComfyUI's Load VAE)")
    ap.add_argument("--adapter", default=None, help="LiteVSR adapter file; default: a new zero-initialised adapter "
                                                    "(output = the bare backbone's)")
    ap.add_argument("--injection", default="direct", help="new adapter only: direct or shared_blocks")
    ap.add_argument("--adapter-rank", type=int, default=0, help="new adapter only: low-rank injection rank (0: full)")
    ap.add_argument("--stand-ins", action="store_true", help="tiny random-weight models (pipeline demonstration)")
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shift", type=float, default=5.0, help="flow time shift of the sigma schedule")
    ap.add_argument("--start", default="noise", help="noise or lr_latent")
    ap.add_argument("--start-sigma", type=float, default=0.4, help="only for --start lr_latent")
    ap.add_argument("--chunk-frames", type=int, default=0, help="4n+1 frames per chunk; 0: the memory planner's")
    ap.add_argument("--overlap-frames", type=int, default=8, help="frames shared by consecutive chunks (4n)")
    ap.add_argument("--segment-chunks", type=int, default=0,
                    help="restart the carried state every N chunks (needed, and the unit of sharing, under "
                         "torchrun); 0: carry it through each shot")
    ap.add_argument("--cut-threshold", type=float, default=None,
                    help="scene-cut threshold (0..1 thumbnail difference); 0 disables detection")
    ap.add_argument("--dit-tile", type=int, default=0, help="DiT tile in output px; 0: auto")
    ap.add_argument("--decode-tile", type=int, default=0, help="VAE decode tile in output px; 0: auto")
    ap.add_argument("--colour", default="lab", help="colour correction: lab, wavelet, adain or none")
    ap.add_argument("--crf", type=int, default=18, help="x264 quality of the output")
    ap.add_argument("--exchange", default=None,
                    help=f"folder for chunks handed to rank 0 (default: .<output name>{EXCHANGE_SUFFIX} beside the "
                         "output; it must be the same folder for every process)")
    args = ap.parse_args(argv)
    if args.stand_ins and (args.dit or args.vae):
        ap.error("--stand-ins builds its own models: leave out --dit and --vae")
    if not args.stand_ins and not (args.dit and args.vae):
        ap.error("--dit and --vae are required (or --stand-ins for tiny random-weight models)")
    return args


# --- distributed ------------------------------------------------------------------------------------------------

def init_distributed(ranks):
    """torch.distributed from torchrun's environment: nccl with one GPU per local rank, gloo on the CPU."""
    import torch
    import torch.distributed as dist

    if not ranks.shared:
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(ranks.local_rank)  # before ComfyUI picks its device (the current CUDA device)
        backend = "nccl"
    else:
        backend = "gloo"
    # Generous: rank 0 plans (a scene-cut pass over the whole video) while the others wait for the plan.
    dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))


def run_headless(ranks, work):
    """Calls `work()` with torch.distributed up (under torchrun) and ComfyUI set up. Returns 0, or 1 after one line
    on stderr (`<tool> failed [on rank N]: Type: message`); the process group is destroyed either way."""
    init_distributed(ranks)
    try:
        import comfy_env

        comfy_env.setup()
        work()
    except Exception as e:
        print(f"{ranks.tool} failed{f' on rank {ranks.rank}' if ranks.shared else ''}: "
              f"{comfy_server._one_line(f'{type(e).__name__}: {e}')}", file=sys.stderr, flush=True)
        return 1
    finally:
        if ranks.shared:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    return 0


def broadcast_ints(values, ranks):
    """Rank 0's list of ints on every rank, as tensors (nothing is pickled)."""
    if not ranks.shared:
        return values
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    length = torch.tensor([len(values) if ranks.rank == 0 else 0], device=device)
    dist.broadcast(length, src=0)
    data = torch.tensor(values if ranks.rank == 0 else [0] * int(length), dtype=torch.int64, device=device)
    dist.broadcast(data, src=0)
    return data.tolist()


def exchange_folder(args, output):
    return Path(args.exchange) if args.exchange else output.with_name(f".{output.name}{EXCHANGE_SUFFIX}")


def clear_exchange(folder):
    """Leftovers of an earlier, failed run (chunks, .partial files, failure marks) would be taken for this run's."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in folder.iterdir():
        if path.name.startswith(("chunk_", FAILED_MARK)):
            path.unlink()


# --- models -----------------------------------------------------------------------------------------------------

def build_stand_ins(folder, dit_dim=256, head_std=None):
    """Tiny random-weight Wan2.1 DiT and VAE files (deterministic: every rank builds the same ones). `head_std`: see
    tiny_models.tiny_wan_dit_state_dict (training uses dim 128 and 1/sqrt(128), so an adapter can steer it)."""
    import tiny_models

    dit = tiny_models.save_tiny_wan_dit(Path(folder) / "tiny_wan21_dit.safetensors", dim=dit_dim, num_layers=2,
                                        head_std=head_std)
    vae = tiny_models.save_tiny_wan21_vae(Path(folder) / "tiny_wan21_vae.safetensors", dim=8)
    return dit, vae


def load_models(dit_path, vae_path):
    """As ComfyUI's stock UNETLoader and VAELoader load them."""
    import comfy.sd
    import comfy.utils

    model = comfy.sd.load_diffusion_model(str(dit_path))
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(vae_path)))
    if hasattr(vae, "throw_exception_if_invalid"):
        vae.throw_exception_if_invalid()
    return model, vae


# --- the run ----------------------------------------------------------------------------------------------------

class FrameDigest:
    """sha256 of the frames as the writer encodes them (uint8 RGB), to compare runs without decoding."""

    def __init__(self):
        self.hash = hashlib.sha256()
        self.frames = 0

    def update(self, frames):
        import torch

        rgb = (frames.detach().to("cpu", torch.float32).clamp(0, 1) * 255).round().to(torch.uint8)
        self.hash.update(rgb.contiguous().numpy().tobytes())
        self.frames += len(frames)


class ChunkLog:
    """A console line per finished chunk, with this rank's count and an ETA, once the chunks are planned."""

    def __init__(self, ranks, job):
        self.ranks, self.job = ranks, job

    def planned(self):
        job, ranks, reader = self.job, self.ranks, self.job.reader
        ranks.say(f"{reader.path.name}: {reader.frame_count} frames {reader.width}x{reader.height} at "
                  f"{float(reader.fps):g} fps -> {job.out_w}x{job.out_h}; {len(job.chunks)} chunks, {len(job.cuts)} "
                  f"scene cuts; {job.sizes.describe()}")
        if ranks.shared:
            ranks.say(f"chunks {job.own.start}..{job.own.stop - 1} of {len(job.chunks)}" if job.own else
                      "no chunks (more processes than segments)", everyone=True)
        self.started, self.done = time.monotonic(), 0

    def __call__(self, index, total):
        self.done += 1
        elapsed = time.monotonic() - self.started
        left = elapsed / self.done * (len(self.job.own) - self.done)
        self.ranks.say(f"chunk {index}/{total} done ({self.done}/{len(self.job.own)} of mine), {elapsed:.0f} s "
                       f"elapsed, about {left:.0f} s left", everyone=True)


def run(args, ranks, frames_to=None):
    """Upscales args.input into args.output; returns rank 0's summary (None on the other ranks). `frames_to`, if
    given, also gets every batch of final frames ([n, H, W, 3] float 0..1) as written, before the lossy encode
    (tools/eval.py scores those)."""
    from comfyui_litevsr.nodes.adapters import adapter_from_file, with_adapter
    from comfyui_litevsr.nodes.backbone import backbone_signature
    from comfyui_litevsr.nodes.core.temporal import DEFAULT_CUT_THRESHOLD
    from comfyui_litevsr.nodes.core.video_io import VideoReader
    from comfyui_litevsr.nodes.streaming import Share, StreamOptions, StreamUpscale

    t0 = time.monotonic()
    source, output = Path(args.input).resolve(), Path(args.output).resolve()
    if source == output:
        raise ValueError("--output must differ from --input")
    reader = VideoReader(source)
    exchange = exchange_folder(args, output)

    with tempfile.TemporaryDirectory(prefix="litevsr-stand-ins-") as scratch:
        dit_path, vae_path = build_stand_ins(scratch) if args.stand_ins else (args.dit, args.vae)
        model, vae = load_models(dit_path, vae_path)
    model = with_adapter(model, *adapter_from_file(backbone_signature(model), args.adapter, args.injection,
                                                   args.adapter_rank))
    load_seconds = time.monotonic() - t0
    ranks.say(f"models loaded in {load_seconds:.1f} s", everyone=ranks.shared)

    options = StreamOptions(
        scale=args.scale, steps=args.steps, shift=args.shift, start=args.start, start_sigma=args.start_sigma,
        seed=args.seed, chunk_frames=args.chunk_frames, overlap_frames=args.overlap_frames,
        scene_cut_threshold=DEFAULT_CUT_THRESHOLD if args.cut_threshold is None else args.cut_threshold,
        dit_tile=args.dit_tile, decode_tile=args.decode_tile, colour=args.colour, crf=args.crf,
        segment_chunks=args.segment_chunks)
    share = Share(rank=ranks.rank, world=ranks.world, per_host=ranks.local_world, exchange=str(exchange),
                  agree=lambda values: broadcast_ints(values, ranks),
                  failed=lambda: (exchange / f"{FAILED_MARK}{ranks.rank}").touch(),
                  is_alive=lambda: not any(exchange.glob(f"{FAILED_MARK}*")))
    job = StreamUpscale(model, vae, reader, options, share)
    if ranks.rank == 0 and ranks.shared:
        clear_exchange(exchange)
    digest = FrameDigest()

    def written(frames):
        digest.update(frames)
        if frames_to is not None:
            frames_to(frames)

    progress = ChunkLog(ranks, job)
    job.run(output, on_plan=progress.planned, on_chunk=progress, on_write=written)
    if ranks.rank != 0:
        ranks.say(f"handed over {len(job.own)} chunks in {time.monotonic() - t0:.1f} s", everyone=True)
        return None
    if ranks.shared and not args.exchange:  # every handed-over chunk was taken and deleted
        left = list(exchange.iterdir())
        if left:
            ranks.say(f"warning: {exchange} still holds {[p.name for p in left]}")
        else:
            exchange.rmdir()
    result = {"output": str(output), "frames": digest.frames, "width": job.out_w, "height": job.out_h,
              "fps": f"{reader.fps}", "audio": reader.has_audio, "chunks": len(job.chunks), "processes": ranks.world,
              "segment_chunks": args.segment_chunks, "seconds": round(time.monotonic() - t0, 1),
              "load_seconds": round(load_seconds, 3),
              "frames_sha256": digest.hash.hexdigest()}
    ranks.say(f"wrote {output}: {digest.frames} frames {job.out_w}x{job.out_h} at {reader.fps} fps, audio "
              f"{'copied' if reader.has_audio else 'none'}, in {result['seconds']} s")
    ranks.say(f"frames sha256 {result['frames_sha256']}")
    return result


def main(argv=None):
    args = parse_args(argv)
    ranks = Ranks()
    if ranks.shared and args.segment_chunks < 1:
        print("upscale failed: several processes share a video by segments: give --segment-chunks N (the result "
              "then equals a one-process run with the same --segment-chunks)", file=sys.stderr)
        return 2
    if args.stand_ins:
        ranks.say(STAND_IN_BANNER)
    status = run_headless(ranks, lambda: run(args, ranks))  # on failure no output file: the writer deletes it
    if status == 0 and args.stand_ins:
        ranks.say(STAND_IN_BANNER)
    return status


if __name__ == "__main__":
    comfy_server.exit_on_signals()
    sys.exit(main())
