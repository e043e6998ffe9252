"""Upscale Video File (LiteVSR): any length, file to file, chunk by chunk with carried state."""
import logging
import os
import time

import comfy.model_management
import comfy.utils
import folder_paths
from comfy_api.latest import InputImpl, io, ui

from .backbone import backbone_signature
from .compare_nodes import UI_KEY as COMPARE_UI_KEY
from .compare_nodes import save_compare
from .core.colour import METHODS
from .core.sampling import flow_sigmas
from .core.stream import VSRPipeline, upscale_chunks
from .core.temporal import DEFAULT_CUT_THRESHOLD, SceneCutDetector, chunk_plan
from .core.video_io import VideoReader, VideoWriter
from .pipeline import check_vae, dit_denoiser, grid_px, hr_decoder, lr_encoder
from .planner import decode_overlap, dit_overlap, plan_for_video, retrying
from .progress import Eta, send_progress
from .sample_nodes import sampling_inputs

log = logging.getLogger("LiteVSR")


def source_path(video):
    """The file behind a VIDEO from Load Video; streaming needs a file it can read lazily. (Only a VideoFromFile is
    asked: the base class's get_stream_source would encode an in-memory video into a buffer first.)"""
    source = video.get_stream_source() if isinstance(video, InputImpl.VideoFromFile) else None
    if not isinstance(source, (str, os.PathLike)) or not os.path.isfile(source):
        raise ValueError("Upscale Video File needs a video loaded from a file (Load Video); this VIDEO lives in "
                         "memory. Save it first, or use the short-clip nodes.")
    # newer ComfyUI (0.33 has it): Video Slice returns the same file with a trim window, which reading the file would ignore
    start, duration = getattr(video, "get_active_trim_window", lambda: (0.0, 0.0))()
    if start or duration:
        raise ValueError(f"This VIDEO is a trimmed view of its file (start {start:g} s, duration {duration:g} s, from "
                         "Video Slice); Upscale Video File reads whole files. Save the trimmed video first (Save "
                         "Video) and load that file, or trim the video before loading it.")
    return source


def check_output_prefix(filename_prefix):
    """Refuses, before any work, a filename_prefix that leads out of the output folder ('..', absolute paths);
    ComfyUI's get_save_image_path would refuse it too, but only at the end and without saying what to do."""
    output = os.path.abspath(folder_paths.get_output_directory())
    target = os.path.abspath(os.path.join(output, os.path.dirname(os.path.normpath(filename_prefix))))
    if os.path.commonpath((output, target)) != output:
        raise ValueError(f"filename_prefix {filename_prefix!r} leads outside ComfyUI's output folder: give a name "
                         "inside it, without '..' or a leading '/' (e.g. LiteVSR/upscaled)")


def scene_cuts(reader, threshold, on_frames=None):
    """A cheap first pass over the video for hard cuts (0 disables detection); `on_frames(done, total)` after each
    batch of frames read."""
    if threshold <= 0:
        return []
    detector = SceneCutDetector(threshold)
    cuts, done = [], 0
    for frames in reader.chunks(64):
        cuts += detector.cut_points(frames)
        done += len(frames)
        if on_frames is not None:
            on_frames(done, reader.frame_count)
        comfy.model_management.throw_exception_if_processing_interrupted()
    return cuts


def stream_overlap(settings, num_frames, overlap_frames):
    """The overlap the chunk plan uses: none when one chunk holds the whole video (each shot is then one chunk,
    and a clip shorter than the overlap would otherwise leave no new frames per chunk)."""
    return 0 if settings.chunk_frames >= num_frames else overlap_frames


def plan_summary(sizes, overlap, chunks=None, cuts=None):
    """The settings the run uses, for the front end's status line (`litevsr.progress` "plan")."""
    stride = sizes.signature.vae_stride
    tile_h, tile_w = sizes.decode_tile_hw_px
    summary = {"width": sizes.out_w, "height": sizes.out_h, "frames": sizes.num_frames,
               "chunk_frames": min(sizes.chunk_frames, sizes.num_frames), "overlap_frames": overlap,
               "dit_tile": [sizes.dit_tile[1] * stride, sizes.dit_tile[0] * stride], "dit_tiled": sizes.dit_tiled,
               "decode_tile": sizes.decode_tile, "decode_tiled": sizes.decode_tiled,
               "decode_tile_hw": [tile_w, tile_h], "auto": list(sizes.auto), "warnings": list(sizes.warnings)}
    if chunks is not None:
        summary["chunks"] = chunks
    if cuts is not None:
        summary["scene_cuts"] = len(cuts)
    return summary


class ChunkProgress:
    """ProgressBar per chunk, a log line with the ETA, and a `litevsr.progress` event with the ETA and the
    settings in use (`summary()`) for the front end."""

    def __init__(self, total, node_id=None, summary=dict):
        self.bar = comfy.utils.ProgressBar(total)
        self.started = time.monotonic()
        self.eta = Eta(0)
        self.node_id, self.summary = node_id, summary
        send_progress(node_id, "chunk", 0, total, None, summary())

    def __call__(self, done, total):
        self.bar.update_absolute(done, total)
        eta = self.eta(done, total)
        log.info("LiteVSR: chunk %d/%d done, %.0f s elapsed, about %.0f s left", done, total,
                 time.monotonic() - self.started, eta)
        send_progress(self.node_id, "chunk", done, total, eta, self.summary())
        comfy.model_management.throw_exception_if_processing_interrupted()


class MiddleFrame:
    """Keeps the LR and the finished HR frame at video position `index` while frames stream past (for the
    before/after comparison), without holding anything else."""

    def __init__(self, index):
        self.index, self.written = index, 0
        self.before = self.after = None

    def lr_chunks(self, plan, chunk_frames):
        for chunk, frames in zip(plan, chunk_frames):
            if self.before is None and chunk.start <= self.index < chunk.stop:
                self.before = frames[self.index - chunk.start].clone()
            yield frames

    def writing(self, write):
        def write_and_keep(frames):
            if self.after is None and self.written <= self.index < self.written + len(frames):
                self.after = frames[self.index - self.written].detach().to("cpu", copy=True)
            write(frames)
            self.written += len(frames)
        return write_and_keep

    def ui_entry(self):
        """The `litevsr_compare` entry, or None when a frame is missing or the temp folder cannot be written."""
        if self.before is None or self.after is None:
            return None
        try:
            return save_compare(self.before, self.after, self.index)
        except OSError as error:
            log.warning("LiteVSR: could not save the before/after comparison: %s", error)
            return None


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
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, vae, video, filename_prefix, scale, seed, steps, shift, start, start_sigma,
                chunk_frames, overlap_frames, scene_cut_threshold, dit_tile, decode_tile, colour,
                crf) -> io.NodeOutput:
        node_id = getattr(cls.hidden, "unique_id", None)
        check_output_prefix(filename_prefix)
        source = source_path(video)
        reader = VideoReader(source)
        signature = backbone_signature(model)
        check_vae(vae, model)
        out_h, out_w = scale * reader.height, scale * reader.width
        settings = plan_for_video(model, signature, reader.frame_count, out_h, out_w, chunk_frames, dit_tile,
                                  decode_tile, overlap_frames)
        (log.warning if settings.warnings else log.info)("%s", settings.describe())
        overlap = stream_overlap(settings, reader.frame_count, overlap_frames)
        scan_eta = Eta(0)
        cuts = scene_cuts(reader, scene_cut_threshold, lambda done, total: send_progress(
            node_id, "scene_cuts", done, total, scan_eta(done, total), plan_summary(settings, overlap)))
        plan = chunk_plan(reader.frame_count, settings.chunk_frames, overlap, cuts)
        log.info("LiteVSR: %d frames at %s fps in %d chunk(s), overlap %d frames, %d scene cut(s)%s%s",
                 reader.frame_count, float(reader.fps), len(plan), overlap, len(cuts),
                 f" at frames {cuts[:10]}" + ("..." if len(cuts) > 10 else "") if cuts else "",
                 ", with audio" if reader.has_audio else ", no audio")
        sigmas = flow_sigmas(steps, shift, 1.0 if start == "noise" else start_sigma)

        in_use = {"sizes": settings}  # the sizes of the last chunk (an out-of-memory retry shrinks them)

        def pipeline_for(sizes):
            in_use["sizes"] = sizes
            return VSRPipeline(lr_encoder(vae, model), dit_denoiser(model, sizes.dit_tile, dit_overlap(sizes)),
                               hr_decoder(vae, model, sizes.decode_tile, decode_overlap(sizes)), grid_px(vae),
                               scale, sigmas, start, seed, colour).process

        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, folder_paths.get_output_directory(), out_w, out_h)
        file = f"{name}_{counter:05}_.mp4"
        path = os.path.join(folder, file)
        middle = MiddleFrame(reader.frame_count // 2)
        progress = ChunkProgress(len(plan), node_id, lambda: plan_summary(in_use["sizes"], overlap, len(plan), cuts))
        with VideoWriter(path, reader.fps, out_w, out_h, audio_from=source if reader.has_audio else None,
                         crf=crf) as writer:
            upscale_chunks(plan, middle.lr_chunks(plan, reader.ranges([(chunk.start, chunk.stop) for chunk in plan])),
                           retrying(pipeline_for, settings), middle.writing(writer.write), on_chunk=progress)
        shown = ui.PreviewVideo([ui.SavedResult(file, subfolder, io.FolderType.output)]).as_dict()
        compare = middle.ui_entry()
        if compare is not None:
            shown[COMPARE_UI_KEY] = [compare]
        return io.NodeOutput(path, ui=shown)
