"""Upscale a video file to a video file with the pack's core, in this process (no ComfyUI server).

    python -m tools.upscale --input in.mp4 --output out.mp4 --dit wan_dit.safetensors --vae wan_vae.safetensors \
        [--adapter adapter.safetensors] [--scale 4] [--steps 1] [--seed 0] [--chunk-frames 0] [--overlap-frames 8] \
        [--segment-chunks 0] [--cut-threshold 0.06] [--colour lab] [--decoder lighttaew2_1.safetensors]
    python -m tools.upscale --input in.mp4 --output out.mp4 --stand-ins      # tiny random-weight models
    python -m tools.upscale --input in.mp4 --output out.mp4 --infvsr --dit InfVSR.ckpt --vae wan_2.1_vae.safetensors \
        --reference ram_swin_large_14m.pth DAPE.pth [--scale 4]                # InfVSR's causal stream
    torchrun --nproc_per_node=K -m tools.upscale ... --segment-chunks N       # K processes share the video

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
import hashlib
import sys
import tempfile
import time
from pathlib import Path

from tools import comfy_env, comfy_server
from tools.headless import (Ranks, add_model_arguments, build_infvsr_stand_ins, build_stand_ins,
                            check_model_arguments, load_models, load_text_encoder, load_vae, run_headless,
                            stand_in_banner)

STAND_IN_BANNER = stand_in_banner("--stand-ins")
EXCHANGE_SUFFIX = ".litevsr-exchange"
FAILED_MARK = "failed_rank"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="LiteVSR: upscale a video file headless (torchrun shares the chunks)")
    ap.add_argument("--input", required=True, help="LR video file")
    ap.add_argument("--output", required=True, help="output file (.mp4, .mkv, ...); written atomically")
    add_model_arguments(ap, "pipeline demonstration")
    ap.add_argument("--decoder", default=None,
                    help="a faster decoder of the same latents, as for Load VAE (taew2_1, lighttaew2_1, lightvaew2_1 "
                         "for Wan2.1; taew2_2, lighttaew2_2 for Wan2.2); default: the Wan VAE decodes")
    ap.add_argument("--infvsr", action="store_true",
                    help="--dit is InfVSR's DiT (InfVSR.ckpt or its safetensors conversion): run InfVSR's causal "
                         "stream, one step per chunk (the sampling, chunk and adapter options do not apply)")
    ap.add_argument("--reference", nargs=2, metavar=("RAM", "DAPE"),
                    help="with --infvsr: InfVSR's reference encoder files (ram_swin_large_14m.pth, DAPE.pth)")
    ap.add_argument("--adapter", default=None, help="LiteVSR adapter file; default: a new zero-initialised adapter "
                                                    "(output = the bare backbone's)")
    ap.add_argument("--injection", default="direct", help="new adapter only: direct or shared_blocks")
    ap.add_argument("--adapter-rank", type=int, default=0, help="new adapter only: low-rank injection rank (0: full)")
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shift", type=float, default=5.0, help="flow time shift of the sigma schedule")
    sampling = comfy_env.core_module("sampling")  # before ComfyUI: see comfy_env.core_module
    ap.add_argument("--start", default="noise", choices=sampling.START_MODES, help="noise or lr_latent")
    ap.add_argument("--start-sigma", type=float, default=sampling.LR_LATENT_START_SIGMA,
                    help=f"only for --start lr_latent (default {sampling.LR_LATENT_START_SIGMA})")
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
    if args.infvsr and not (args.reference or args.stand_ins):
        ap.error("--infvsr needs --reference RAM DAPE (or --stand-ins)")
    if args.reference and not args.infvsr:
        ap.error("--reference is only for --infvsr")
    if args.infvsr and args.text_encoder:
        ap.error("--text-encoder is not for --infvsr: InfVSR's DiT reads its reference encoder's tokens as context")
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
    (bench/eval.py scores those)."""
    from comfyui_litevsr.nodes.adapters import adapter_from_file, with_adapter
    from comfyui_litevsr.nodes.backbone import backbone_signature
    from comfyui_litevsr.nodes.core.temporal import DEFAULT_CUT_THRESHOLD
    from comfyui_litevsr.nodes.core.video_io import VideoReader
    from comfyui_litevsr.nodes.decoders import describe
    from comfyui_litevsr.nodes.infvsr import load_infvsr_dit
    from comfyui_litevsr.nodes.reference import load_reference_encoder
    from comfyui_litevsr.nodes.streaming import Share, StreamOptions, StreamUpscale

    t0 = time.monotonic()
    source, output = Path(args.input).resolve(), Path(args.output).resolve()
    if source == output:
        raise ValueError("--output must differ from --input")
    reader = VideoReader(source)
    exchange = exchange_folder(args, output)

    reference = None
    with tempfile.TemporaryDirectory(prefix="litevsr-stand-ins-") as scratch:
        if args.infvsr:
            dit_path, vae_path, *reference_paths = (build_infvsr_stand_ins(scratch) if args.stand_ins else
                                                    (args.dit, args.vae, *args.reference))
            model, vae = load_infvsr_dit(str(dit_path)), load_vae(vae_path)
            reference = load_reference_encoder(*map(str, reference_paths))
        else:
            dit_path, vae_path = build_stand_ins(scratch) if args.stand_ins else (args.dit, args.vae)
            model, vae = load_models(dit_path, vae_path)
    decoder = load_vae(args.decoder) if args.decoder else None
    if not args.infvsr:
        model = with_adapter(model, *adapter_from_file(backbone_signature(model), args.adapter, args.injection,
                                                       args.adapter_rank),
                             text_encoder=load_text_encoder(args.text_encoder))
    load_seconds = time.monotonic() - t0
    ranks.say(f"models loaded in {load_seconds:.1f} s" + (f"; decoding with the {describe(decoder)}" if decoder else ""),
              everyone=ranks.shared)

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
    job = StreamUpscale(model, vae, reader, options, share, decoder=decoder, reference=reference)
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
