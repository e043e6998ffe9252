"""Upscale a video file to a video file with the pack's core, in this process (no ComfyUI server).

    python -m tools.upscale --input in.mp4 --output out.mp4 --dit wan_dit.safetensors --vae wan_vae.safetensors \
        [--adapter adapter.safetensors] [--scale 4] [--steps 1] [--seed 0] [--chunk-frames 0] [--overlap-frames 8] \
        [--segment-chunks 0] [--cut-threshold 0.06] [--colour lab]
    python -m tools.upscale --input in.mp4 --output out.mp4 --stand-ins      # tiny random-weight models
    torchrun --nproc_per_node=K -m tools.upscale ... --segment-chunks N       # K processes share the video

The models are loaded exactly as ComfyUI's stock "Load Diffusion Model" and "Load VAE" nodes load them, the adapter
(a file, or a fresh zero-initialised one) is attached as "Attach State-Aware Adapter" attaches it, and the chunks
run through the same VSRPipeline as the "Upscale Video File" node: frames are read lazily, stitched and encoded as
soon as they are final, audio is copied, and the file appears under its final name only when complete.

Under torchrun (RANK / WORLD_SIZE set) every process loads the models, rank 0 plans (memory sizes, scene cuts) and
hands the plan to all, the ranks take contiguous chunk ranges cut on segment boundaries (`--segment-chunks`, where
the carried state restarts), ranks other than 0 hand their finished chunks to rank 0 through safetensors files in
an exchange folder next to the output, and rank 0 writes the file. The frames are the same for any number of
processes given the same --segment-chunks (a one-process run with that --segment-chunks included); the digest
printed at the end is that of the frames as encoded.
"""
import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

from tools import comfy_server
from tools.headless import (Ranks, add_model_arguments, build_stand_ins, check_model_arguments, load_models,
                            run_headless, stand_in_banner)

STAND_IN_BANNER = stand_in_banner("--stand-ins")
EXCHANGE_SUFFIX = ".litevsr-exchange"
FAILED_MARK = "failed_rank"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="LiteVSR: upscale a video file headless (torchrun shares the chunks)")
    ap.add_argument("--input", required=True, help="LR video file")
    ap.add_argument("--output", required=True, help="output file (.mp4, .mkv, ...); written atomically")
    add_model_arguments(ap, "pipeline demonstration")
    ap.add_argument("--adapter", default=None, help="LiteVSR adapter file; default: a new zero-initialised adapter "
                                                    "(output = the bare backbone's)")
    ap.add_argument("--injection", default="direct", help="new adapter only: direct or shared_blocks")
    ap.add_argument("--adapter-rank", type=int, default=0, help="new adapter only: low-rank injection rank (0: full)")
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
    check_model_arguments(ap, args)
    return args


# --- distributed ------------------------------------------------------------------------------------------------

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

def with_adapter(model, adapter_path, injection, rank):
    import torch
    from comfyui_litevsr.nodes.backbone import attach_adapter, backbone_signature
    from comfyui_litevsr.nodes.core.adapter_file import load_adapter
    from comfyui_litevsr.nodes.core.geometry import TEXT_TOKENS
    from comfyui_litevsr.nodes.model_nodes import new_adapter

    signature = backbone_signature(model)
    if adapter_path:
        module, context = load_adapter(str(adapter_path), signature)
    else:
        module, context = new_adapter(signature, injection, rank), None
    if context is None:
        context = torch.zeros(1, TEXT_TOKENS, signature.text_dim)
    return attach_adapter(model, module, context)


# --- planning ---------------------------------------------------------------------------------------------------

def plan_sizes(model, signature, reader, args, ranks):
    """Chunk length and tile sizes from the memory planner (explicit sizes honoured), for a streamed output. The
    processes on one machine share its RAM (and, on the CPU, its compute memory), so each plans with its share."""
    from comfyui_litevsr.nodes.planner import plan_for_video

    return plan_for_video(model, signature, reader.frame_count, args.scale * reader.height,
                          args.scale * reader.width, args.chunk_frames, args.dit_tile, args.decode_tile,
                          args.overlap_frames, processes_per_host=ranks.local_world)


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


def chunk_progress(ranks, total_in_range):
    started = time.monotonic()
    state = {"done": 0}

    def on_chunk(index, total):
        state["done"] += 1
        elapsed = time.monotonic() - started
        left = elapsed / state["done"] * (total_in_range - state["done"])
        ranks.say(f"chunk {index}/{total} done ({state['done']}/{total_in_range} of mine), {elapsed:.0f} s elapsed, "
                  f"about {left:.0f} s left", everyone=True)

    return on_chunk


def run(args, ranks, frames_to=None):
    """Upscales args.input into args.output; returns rank 0's summary (None on the other ranks). `frames_to`, if
    given, also gets every batch of final frames ([n, H, W, 3] float 0..1) as written, before the lossy encode
    (tools/eval.py scores those)."""
    import torch

    from comfyui_litevsr.nodes.backbone import backbone_signature
    from comfyui_litevsr.nodes.core.distributed import rank_ranges, upscale_shared
    from comfyui_litevsr.nodes.core.sampling import flow_sigmas
    from comfyui_litevsr.nodes.core.stream import VSRPipeline, upscale_chunks
    from comfyui_litevsr.nodes.core.temporal import DEFAULT_CUT_THRESHOLD, chunk_plan
    from comfyui_litevsr.nodes.core.video_io import VideoReader, VideoWriter
    from comfyui_litevsr.nodes.pipeline import dit_denoiser, grid_px, hr_decoder, lr_encoder
    from comfyui_litevsr.nodes.planner import decode_overlap, dit_overlap, retrying
    from comfyui_litevsr.nodes.stream_nodes import scene_cuts, stream_overlap

    t0 = time.monotonic()
    source, output = Path(args.input).resolve(), Path(args.output).resolve()
    if source == output:
        raise ValueError("--output must differ from --input")
    reader = VideoReader(source)
    threshold = DEFAULT_CUT_THRESHOLD if args.cut_threshold is None else args.cut_threshold
    exchange = exchange_folder(args, output)

    with tempfile.TemporaryDirectory(prefix="litevsr-stand-ins-") as scratch:
        dit_path, vae_path = build_stand_ins(scratch) if args.stand_ins else (args.dit, args.vae)
        model, vae = load_models(dit_path, vae_path)
    model = with_adapter(model, args.adapter, args.injection, args.adapter_rank)
    signature = backbone_signature(model)
    load_seconds = time.monotonic() - t0
    ranks.say(f"models loaded in {load_seconds:.1f} s", everyone=ranks.shared)

    # Rank 0 decides everything that could differ between processes (free memory) or costs a pass (scene cuts).
    settings = plan_sizes(model, signature, reader, args, ranks)
    decided = None
    if ranks.rank == 0:
        if ranks.shared:
            clear_exchange(exchange)
        decided = [settings.chunk_frames, *settings.dit_tile, settings.decode_tile,
                   *scene_cuts(reader, threshold)]
    chunk_frames, tile_h, tile_w, decode_tile, *cuts = broadcast_ints(decided, ranks)
    settings = settings.with_sizes(chunk_frames=chunk_frames, dit_tile=(tile_h, tile_w), decode_tile=decode_tile)
    overlap = stream_overlap(settings, reader.frame_count, args.overlap_frames)
    plan = chunk_plan(reader.frame_count, settings.chunk_frames, overlap, cuts)
    out_h, out_w = args.scale * reader.height, args.scale * reader.width
    ranks.say(f"{source.name}: {reader.frame_count} frames {reader.width}x{reader.height} at {float(reader.fps):g} "
              f"fps -> {out_w}x{out_h}; {len(plan)} chunks, {len(cuts)} scene cuts; {settings.describe()}")
    if ranks.shared:
        start, stop = rank_ranges(len(plan), args.segment_chunks, ranks.world)[ranks.rank]
        ranks.say(f"chunks {start}..{stop - 1} of {len(plan)}" if stop > start else "no chunks (more processes "
                  "than segments)", everyone=True)
        own = stop - start
    else:
        own = len(plan)

    sigmas = flow_sigmas(args.steps, args.shift, 1.0 if args.start == "noise" else args.start_sigma)

    def pipeline_for(sizes):
        return VSRPipeline(lr_encoder(vae, model), dit_denoiser(model, sizes.dit_tile, dit_overlap(sizes)),
                           hr_decoder(vae, model, sizes.decode_tile, decode_overlap(sizes)), grid_px(vae),
                           args.scale, sigmas, args.start, args.seed, args.colour).process

    process = retrying(pipeline_for, settings)
    on_chunk = chunk_progress(ranks, own)

    def read_chunks(indices):
        return reader.ranges([(plan[i].start, plan[i].stop) for i in indices])

    with torch.inference_mode():
        if ranks.rank != 0:
            failed_mark = exchange / f"{FAILED_MARK}{ranks.rank}"
            try:
                upscale_shared(plan, ranks.rank, ranks.world, args.segment_chunks, read_chunks, process, None,
                               str(exchange), on_chunk)
            except BaseException:
                failed_mark.touch()  # rank 0 stops waiting for chunks that will never come
                raise
            ranks.say(f"handed over {own} chunks in {time.monotonic() - t0:.1f} s", everyone=True)
            return None

        digest = FrameDigest()
        audio = source if reader.has_audio else None
        with VideoWriter(output, reader.fps, out_w, out_h, audio_from=audio, crf=args.crf) as writer:
            def write(frames):
                writer.write(frames)
                digest.update(frames)
                if frames_to is not None:
                    frames_to(frames)

            if ranks.shared:
                upscale_shared(plan, 0, ranks.world, args.segment_chunks, read_chunks, process, write, str(exchange),
                               on_chunk, is_alive=lambda: not any(exchange.glob(f"{FAILED_MARK}*")))
            else:
                upscale_chunks(plan, read_chunks(range(len(plan))), process, write, on_chunk, args.segment_chunks)
        if ranks.shared and not args.exchange:  # every handed-over chunk was taken and deleted
            left = list(exchange.iterdir())
            if left:
                ranks.say(f"warning: {exchange} still holds {[p.name for p in left]}")
            else:
                exchange.rmdir()
    result = {"output": str(output), "frames": digest.frames, "width": out_w, "height": out_h,
              "fps": f"{reader.fps}", "audio": audio is not None, "chunks": len(plan), "processes": ranks.world,
              "segment_chunks": args.segment_chunks, "seconds": round(time.monotonic() - t0, 1),
              "load_seconds": round(load_seconds, 3),
              "frames_sha256": digest.hash.hexdigest()}
    ranks.say(f"wrote {output}: {digest.frames} frames {out_w}x{out_h} at {reader.fps} fps, audio "
              f"{'copied' if audio else 'none'}, in {result['seconds']} s")
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
