"""Upscale Video File (LiteVSR): any length, file to file, chunk by chunk with carried state."""
import logging
import os
import time

import comfy.model_management
import comfy.utils
import folder_paths
from comfy_api.latest import InputImpl, io, ui

from .backbone import backbone_signature
from .core.colour import METHODS
from .core.sampling import flow_sigmas
from .core.stream import VSRPipeline, upscale_chunks
from .core.temporal import DEFAULT_CUT_THRESHOLD, SceneCutDetector, chunk_plan
from .core.video_io import VideoReader, VideoWriter
from .pipeline import dit_denoiser, grid_px, hr_decoder, lr_encoder
from .planner import decode_overlap, dit_overlap, plan_for_video, retrying
from .sample_nodes import sampling_inputs

log = logging.getLogger("LiteVSR")


def source_path(video):
    """The file behind a VIDEO from Load Video; streaming needs a file it can read lazily. (Only a VideoFromFile is
    asked: the base class's get_stream_source would encode an in-memory video into a buffer first.)"""
    source = video.get_stream_source() if isinstance(video, InputImpl.VideoFromFile) else None
    if not isinstance(source, (str, os.PathLike)) or not os.path.isfile(source):
        raise ValueError("Upscale Video File needs a video loaded from a file (Load Video); this VIDEO lives in "
                         "memory. Save it first, or use the short-clip nodes.")
    return source


def scene_cuts(reader, threshold):
    """A cheap first pass over the video for hard cuts (0 disables detection)."""
    if threshold <= 0:
        return []
    detector = SceneCutDetector(threshold)
    cuts = []
    for frames in reader.chunks(64):
        cuts += detector.cut_points(frames)
        comfy.model_management.throw_exception_if_processing_interrupted()
    return cuts


def stream_overlap(settings, num_frames, overlap_frames):
    """The overlap the chunk plan uses: none when one chunk holds the whole video (each shot is then one chunk,
    and a clip shorter than the overlap would otherwise leave no new frames per chunk)."""
    return 0 if settings.chunk_frames >= num_frames else overlap_frames


class ChunkProgress:
    """ProgressBar per chunk, and a log line with the ETA."""

    def __init__(self, total):
        self.bar = comfy.utils.ProgressBar(total)
        self.started = time.monotonic()

    def __call__(self, done, total):
        self.bar.update_absolute(done, total)
        elapsed = time.monotonic() - self.started
        log.info("LiteVSR: chunk %d/%d done, %.0f s elapsed, about %.0f s left", done, total, elapsed,
                 elapsed / done * (total - done))
        comfy.model_management.throw_exception_if_processing_interrupted()


class LiteVSRUpscaleVideoFile(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LiteVSRUpscaleVideoFile",
            display_name="Upscale Video File (LiteVSR, streaming)",
            category="LiteVSR",
            description="Upscales a video of any length straight from its file to a new file in the output folder, "
                        "chunk by chunk: frames are read lazily, each chunk is conditioned on the finished frames of "
                        "the previous one (reset at scene cuts), overlaps are cross-faded, and frames are encoded as "
                        "soon as they are final, so memory does not grow with the video's length. Frame count, "
                        "frame rate and audio are kept. The file appears under its final name only when complete.",
            inputs=[
                io.Model.Input("model", tooltip="The Wan DiT with an adapter from 'Attach State-Aware Adapter'."),
                io.Vae.Input("vae", tooltip="The Wan VAE matching the DiT."),
                io.Video.Input("video", tooltip="The LR video, from Load Video (read from its file as it goes)."),
                io.String.Input("filename_prefix", default="LiteVSR/upscaled",
                                tooltip="Output name inside ComfyUI's output folder; a counter and .mp4 are added."),
                io.Int.Input("scale", default=4, min=1, max=8, tooltip="Upscale factor for width and height."),
                *sampling_inputs(),
                # step 1: the front end snaps INT widgets to min + k * step, and 0 (auto) and 4n+1 share no grid
                io.Int.Input("chunk_frames", default=0, min=0, max=1001, step=1,
                             tooltip="Frames per chunk, 4n+1 (e.g. 33, 81). 0: auto, the longest chunk that fits "
                                     "the memory planner's budget."),
                io.Int.Input("overlap_frames", default=8, min=0, max=256, step=4,
                             tooltip="Frames shared by consecutive chunks (a multiple of 4): the next chunk is "
                                     "conditioned on the previous chunk's finished frames there and the two are "
                                     "cross-faded."),
                io.Float.Input("scene_cut_threshold", default=DEFAULT_CUT_THRESHOLD, min=0.0, max=1.0, step=0.005,
                               tooltip="Mean absolute difference of consecutive thumbnails (0..1) that counts as a "
                                       "hard cut; the carried state is reset there so one shot never bleeds into "
                                       "the next. 0 disables detection."),
                io.Int.Input("dit_tile", default=0, min=0, max=8192, step=16,
                             tooltip="DiT spatial tile in output pixels; 0: auto (training resolution, smaller if "
                                     "the planner says memory is short)."),
                io.Int.Input("decode_tile", default=0, min=0, max=8192, step=16,
                             tooltip="VAE decode tile in output pixels; 0: auto from the memory planner."),
                io.Combo.Input("colour", options=list(METHODS), default="lab",
                               tooltip="Colour correction against the LR frames (per chunk)."),
                io.Int.Input("crf", default=18, min=0, max=51,
                             tooltip="x264 quality of the output file: lower is better and larger; 18 is visually "
                                     "lossless for most content."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Full path of the written video file.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, vae, video, filename_prefix, scale, seed, steps, shift, start, start_sigma,
                chunk_frames, overlap_frames, scene_cut_threshold, dit_tile, decode_tile, colour,
                crf) -> io.NodeOutput:
        source = source_path(video)
        reader = VideoReader(source)
        signature = backbone_signature(model)
        out_h, out_w = scale * reader.height, scale * reader.width
        settings = plan_for_video(model, signature, reader.frame_count, out_h, out_w, chunk_frames, dit_tile,
                                  decode_tile, overlap_frames)
        (log.warning if settings.warnings else log.info)("%s", settings.describe())
        overlap = stream_overlap(settings, reader.frame_count, overlap_frames)
        cuts = scene_cuts(reader, scene_cut_threshold)
        plan = chunk_plan(reader.frame_count, settings.chunk_frames, overlap, cuts)
        log.info("LiteVSR: %d frames at %s fps in %d chunk(s), overlap %d frames, %d scene cut(s)%s%s",
                 reader.frame_count, float(reader.fps), len(plan), overlap, len(cuts),
                 f" at frames {cuts[:10]}" + ("..." if len(cuts) > 10 else "") if cuts else "",
                 ", with audio" if reader.has_audio else ", no audio")
        sigmas = flow_sigmas(steps, shift, 1.0 if start == "noise" else start_sigma)

        def pipeline_for(sizes):
            return VSRPipeline(lr_encoder(vae, model), dit_denoiser(model, sizes.dit_tile, dit_overlap(sizes)),
                               hr_decoder(vae, model, sizes.decode_tile, decode_overlap(sizes)), grid_px(vae),
                               scale, sigmas, start, seed, colour).process

        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, folder_paths.get_output_directory(), out_w, out_h)
        file = f"{name}_{counter:05}_.mp4"
        path = os.path.join(folder, file)
        with VideoWriter(path, reader.fps, out_w, out_h, audio_from=source if reader.has_audio else None,
                         crf=crf) as writer:
            upscale_chunks(plan, reader.ranges([(chunk.start, chunk.stop) for chunk in plan]),
                           retrying(pipeline_for, settings), writer.write, on_chunk=ChunkProgress(len(plan)))
        return io.NodeOutput(path, ui=ui.PreviewVideo([ui.SavedResult(file, subfolder, io.FolderType.output)]))
