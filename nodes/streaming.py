"""One streaming upscale, file to file: memory plan, scene cuts, the chunks with carried state and an
out-of-memory retry, and the writer. The Upscale Video File node and tools/upscale.py both run it, with their own
callbacks (progress, interrupts, taps on the frames) and, under torchrun, this process's `Share` of the video."""
import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .adapters import check_distilled_steps
from .backbone import backbone_signature
from .causal_stream import CausalUpscale
from .core import oom
from .core.causal import causal_chunks, upscale_causal
from .core.distributed import rank_ranges, upscale_shared
from .core.dit_tiling import default_overlap, patch_multiple
from .core.sampling import first_sigma, flow_sigmas
from .core.stream import VSRPipeline, upscale_chunks
from .core.temporal import SceneCutDetector, split_chunks
from .core.video_io import VideoWriter
from .decoders import check_decoder
from .infvsr import is_infvsr
from .pipeline import adapter_memory, check_vae, context_sigma, dit_denoiser, grid_px, hr_decoder, lr_encoder
from .planner import is_oom, plan_for_video

log = logging.getLogger("LiteVSR")
DECODE_OVERLAP_PX = 64


def decode_overlap(plan):
    """Decode tile overlap in px: 64 px, less for tiny tiles, on the VAE stride."""
    stride = plan.signature.vae_stride
    return min(DECODE_OVERLAP_PX, plan.decode_tile // 4 // stride * stride)


def dit_overlap(plan):
    return default_overlap(plan.dit_tile, patch_multiple(plan.signature))


def retrying(process_for_plan, plan):
    """process(frames, first_frame, known, memory) that runs `process_for_plan(plan)` and, on running out of memory
    in the DiT or the decode, halves that stage's tile and redoes the chunk; later chunks keep the sizes that
    worked. (The chunk length is fixed once streaming has started.)"""
    state = {"plan": plan}

    def process(frames, first_frame, known, memory):
        result, state["plan"] = oom.run_with_oom_retry(
            lambda current: process_for_plan(current)(frames, first_frame, known, memory), state["plan"],
            is_oom=is_oom, on_retry=log.warning)
        return result

    return process


def _nothing(*_):
    pass


@dataclass(frozen=True)
class StreamOptions:
    """The settings of a run; 0 means auto for chunk_frames, dit_tile and decode_tile (px)."""

    scale: int
    steps: int
    shift: float
    start: str
    start_sigma: float
    seed: int
    chunk_frames: int
    overlap_frames: int
    scene_cut_threshold: float
    dit_tile: int
    decode_tile: int
    colour: str
    crf: int
    segment_chunks: int = 0  # restart the carried state every N chunks (0: never within a shot)


@dataclass(frozen=True)
class Share:
    """This process's share of a video that several processes upscale together (torchrun); the default is one
    process with all of it. See core/distributed.py."""

    rank: int = 0
    world: int = 1
    per_host: int = 1  # processes on this machine: they share its memory
    exchange: Optional[str] = None  # folder through which the other ranks hand finished chunks to rank 0
    agree: Callable = lambda values: values  # rank 0's list of ints, on every rank
    failed: Callable = _nothing  # a rank other than 0 failed (rank 0 must stop waiting for its chunks)
    is_alive: Callable = lambda: True  # on rank 0: whether the other ranks still run


def scene_cuts(reader, threshold, on_frames=_nothing, check_interrupt=_nothing):
    """A cheap first pass over the video for hard cuts (0 disables detection); `on_frames(done, total)` after each
    batch of frames read."""
    if threshold <= 0:
        return []
    detector = SceneCutDetector(threshold)
    cuts, done = [], 0
    for frames in reader.chunks(64):
        cuts += detector.cut_points(frames)
        done += len(frames)
        on_frames(done, reader.frame_count)
        check_interrupt()
    return cuts


def stream_overlap(sizes, num_frames, overlap_frames):
    """The overlap the chunk plan uses: none when one chunk holds the whole video (each shot is then one chunk,
    and a clip shorter than the overlap would otherwise leave no new frames per chunk)."""
    return 0 if sizes.chunk_frames >= num_frames else overlap_frames


def check_causal(model, reference, decoder, share):
    """Whether the run is InfVSR's causal stream (an InfVSR MODEL), refusing what that stream cannot take."""
    causal = is_infvsr(model)
    if causal and reference is None:
        raise ValueError("This is an InfVSR model: it is conditioned on the first frame of each shot, so connect "
                         "'Load InfVSR Reference Encoder' to the reference input.")
    if not causal and reference is not None:
        raise ValueError("A reference encoder is only for an InfVSR model from 'Load InfVSR Model'; disconnect it "
                         "for a LiteVSR adapter.")
    if causal and decoder is not None:
        raise ValueError("InfVSR streams the Wan VAE's causal decoder cache from chunk to chunk; a separate decoder "
                         "cannot carry it. Disconnect the decoder input.")
    if causal and share.world > 1:
        raise ValueError("InfVSR's causal stream chains every chunk to the previous one: run it in one process "
                         "(without torchrun).")
    return causal


class StreamUpscale:
    """Upscales the video `reader` reads with `model` (adapter attached) and `vae` (`decoder`, when given, decodes
    instead: a tiny or light Wan decoder of the same latents). An InfVSR model (`reference`: its reference encoder)
    runs InfVSR's causal stream instead: consecutive chunks with carried caches (core/causal.py). Construction
    checks the VAEs and plans the sizes (`sizes`, output `out_w` x `out_h`); `run` does the rest. Callbacks read
    the state from here:
    `sizes` and `overlap` (planned), `cuts`, `chunks` and `own` (this process's chunk indices) once planned,
    `in_use` (the sizes of the latest chunk: an out-of-memory retry shrinks them)."""

    def __init__(self, model, vae, reader, options, share=Share(), decoder=None, reference=None):
        check_vae(vae, model)
        self.causal = check_causal(model, reference, decoder, share)
        check_distilled_steps(model, options.steps)
        self.reference = reference
        self.decoder = decoder or vae  # a faster decoder of the same latents, for decoding only
        check_decoder(self.decoder, vae.latent_channels)
        self.model, self.vae, self.reader, self.options, self.share = model, vae, reader, options, share
        self.out_h, self.out_w = options.scale * reader.height, options.scale * reader.width
        self._plan_sizes(plan_for_video(model, backbone_signature(model), reader.frame_count, self.out_h,
                                        self.out_w, options.chunk_frames, options.dit_tile, options.decode_tile,
                                        options.overlap_frames, processes_per_host=share.per_host))
        self.cuts = self.chunks = self.own = None

    def _plan_sizes(self, sizes):
        self.sizes = self.in_use = sizes
        self.overlap = 0 if self.causal else stream_overlap(sizes, self.reader.frame_count,
                                                            self.options.overlap_frames)

    def run(self, output, on_scan=_nothing, on_plan=_nothing, on_chunk=_nothing, on_read=_nothing,
            on_write=_nothing, check_interrupt=_nothing):
        """Writes the upscaled video to `output` (on rank 0; the other ranks hand their chunks over). Callbacks:
        `on_scan(done, total)` frames of the scene-cut pass, `on_plan()` once the chunk plan is made,
        `on_chunk(done, total)` after each chunk, `on_read(chunk, lr_frames)` for each chunk read,
        `on_write(frames)` for the finished frames as written, and `check_interrupt(*progress)` after each chunk,
        tile and batch of the scene-cut pass (it raises to stop the run)."""
        options, share, reader = self.options, self.share, self.reader
        # Rank 0 decides what could differ between processes (free memory) or costs a pass (scene cuts).
        decided = None
        if share.rank == 0:
            decided = [self.sizes.chunk_frames, *self.sizes.dit_tile, self.sizes.decode_tile,
                       *scene_cuts(reader, options.scene_cut_threshold, on_scan, check_interrupt)]
        chunk_frames, tile_h, tile_w, decode_tile, *self.cuts = share.agree(decided)
        self._plan_sizes(self.sizes.with_sizes(chunk_frames=chunk_frames, dit_tile=(tile_h, tile_w),
                                               decode_tile=decode_tile))
        if self.causal:
            self.chunks = causal_chunks(reader.frame_count, self.cuts)
            log.info("LiteVSR: InfVSR causal stream, one step per chunk (9 frames, then 12), whole frames; the "
                     "memory plan's chunk and tile sizes do not apply")
            if self.sizes.dit_tiled or self.sizes.decode_tiled:
                log.warning("LiteVSR: the memory planner would tile this output (%dx%d), but InfVSR's causal stream "
                            "runs whole frames: it may run out of memory; a smaller scale needs less",
                            self.out_w, self.out_h)
        else:
            self.chunks = split_chunks(reader.frame_count, self.sizes.chunk_frames, self.overlap, self.cuts)
        self.own = range(len(self.chunks))
        if share.world > 1:
            self.own = range(*rank_ranges(len(self.chunks), options.segment_chunks, share.world)[share.rank])
        on_plan()

        sigmas = flow_sigmas(options.steps, options.shift, first_sigma(options.start, options.start_sigma))

        def pipeline_for(sizes):
            self.in_use = sizes
            return VSRPipeline(lr_encoder(self.vae, self.model),
                               dit_denoiser(self.model, sizes.dit_tile, dit_overlap(sizes), check_interrupt),
                               hr_decoder(self.decoder, self.model, sizes.decode_tile, decode_overlap(sizes),
                                          check_interrupt),
                               grid_px(self.vae), options.scale, sigmas, options.start, options.seed,
                               options.colour, context_sigma=context_sigma(self.model)).process

        def read(indices):
            spans = [(self.chunks[index].start, self.chunks[index].stop) for index in indices]
            for index, frames in zip(indices, reader.ranges(spans)):
                on_read(self.chunks[index], frames)
                yield frames

        def chunk_done(done, total):
            on_chunk(done, total)
            check_interrupt()

        process = retrying(pipeline_for, self.sizes)
        remember = adapter_memory(self.model)
        with torch.inference_mode():
            if share.rank != 0:
                try:
                    upscale_shared(self.chunks, share.rank, share.world, options.segment_chunks, read, process, None,
                                   share.exchange, chunk_done, remember=remember)
                except BaseException:
                    share.failed()
                    raise
                return
            audio = reader.path if reader.has_audio else None
            with VideoWriter(output, reader.fps, self.out_w, self.out_h, audio_from=audio, crf=options.crf) as writer:
                def write(frames):
                    writer.write(frames)
                    on_write(frames)

                if self.causal:
                    causal = CausalUpscale(self.model, self.vae, self.reference, options.scale, options.colour)
                    upscale_causal(self.chunks, read(self.own), causal.process, write, chunk_done)
                elif share.world > 1:
                    upscale_shared(self.chunks, 0, share.world, options.segment_chunks, read, process, write,
                                   share.exchange, chunk_done, is_alive=share.is_alive, remember=remember)
                else:
                    upscale_chunks(self.chunks, read(self.own), process, write, chunk_done, options.segment_chunks,
                                   remember)
