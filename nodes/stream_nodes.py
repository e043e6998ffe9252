"""Upscale Video File (LiteVSR): any length, file to file, chunk by chunk with carried state."""
import logging
import os
import time

import comfy.utils
import folder_paths
from comfy_api.latest import InputImpl, io, ui

from .compare_nodes import UI_KEY as COMPARE_UI_KEY
from .compare_nodes import save_compare
from .core.colour import METHODS
from .core.temporal import DEFAULT_CUT_THRESHOLD
from .core.video_io import VideoReader
from .pipeline import check_interrupt
from .progress import Eta, send_progress
from .sample_nodes import sampling_inputs
from .reference import SOCKET_TYPE as REFERENCE_TYPE
from .streaming import StreamOptions, StreamUpscale

log = logging.getLogger("LiteVSR")


def source_path(video):
    """The file behind a VIDEO from Load Video; streaming needs a file it can read lazily. (Only a VideoFromFile is
    asked: the base class's get_stream_source would encode an in-memory video into a buffer first.)"""
    source = video.get_stream_source() if isinstance(video, InputImpl.VideoFromFile) else None
    if not isinstance(source, (str, os.PathLike)) or not os.path.isfile(source):
        raise ValueError("Upscale Video File needs a video loaded from a file (Load Video); this VIDEO lives in "
                         "memory. Save it first, or use the short-clip nodes.")
    # newer ComfyUI (0.33 has it): Video Slice returns the same file with a trim window, which reading the file
    # would ignore
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


def plan_summary(sizes, overlap, chunks=None, cuts=None):
    """The settings the run uses, for the front end's status line (`litevsr.progress` "plan")."""
    tile_h, tile_w = sizes.decode_tile_hw_px
    summary = {"width": sizes.out_w, "height": sizes.out_h, "frames": sizes.num_frames,
               "chunk_frames": min(sizes.chunk_frames, sizes.num_frames), "overlap_frames": overlap,
               "dit_tile": sizes.signature.width_height_px(sizes.dit_tile), "dit_tiled": sizes.dit_tiled,
               "decode_tile": sizes.decode_tile, "decode_tiled": sizes.decode_tiled,
               "decode_tile_hw": [tile_w, tile_h], "auto": list(sizes.auto), "warnings": list(sizes.warnings)}
    if chunks is not None:
        summary["chunks"] = chunks
    if cuts is not None:
        summary["scene_cuts"] = len(cuts)
    return summary


class ChunkProgress:
    """For a StreamUpscale run: ProgressBar per chunk, a log line with the ETA, and `litevsr.progress` events with
    the ETA and the settings in use for the front end (the scene-cut pass too)."""

    def __init__(self, job, node_id=None):
        self.job, self.node_id = job, node_id
        self.scan_eta = Eta(0)

    def summary(self):
        job = self.job
        if job.chunks is None:
            return plan_summary(job.sizes, job.overlap)
        return plan_summary(job.in_use, job.overlap, len(job.chunks), job.cuts)

    def scanning(self, done, total):
        send_progress(self.node_id, "scene_cuts", done, total, self.scan_eta(done, total), self.summary())

    def planned(self):
        job, reader = self.job, self.job.reader
        cuts = job.cuts
        log.info("LiteVSR: %d frames at %s fps in %d chunk(s), overlap %d frames, %d scene cut(s)%s%s",
                 reader.frame_count, float(reader.fps), len(job.chunks), job.overlap, len(cuts),
                 f" at frames {cuts[:10]}" + ("..." if len(cuts) > 10 else "") if cuts else "",
                 ", with audio" if reader.has_audio else ", no audio")
        self.bar = comfy.utils.ProgressBar(len(job.chunks))
        self.started = time.monotonic()
        self.eta = Eta(0)
        send_progress(self.node_id, "chunk", 0, len(job.chunks), None, self.summary())

    def __call__(self, done, total):
        self.bar.update_absolute(done, total)
        eta = self.eta(done, total)
        log.info("LiteVSR: chunk %d/%d done, %.0f s elapsed, about %.0f s left", done, total,
                 time.monotonic() - self.started, eta)
        send_progress(self.node_id, "chunk", done, total, eta, self.summary())


class MiddleFrame:
    """Keeps the LR and the finished HR frame at video position `index` while frames stream past (for the
    before/after comparison), without holding anything else."""

    def __init__(self, index):
        self.index, self.written_count = index, 0
        self.before = self.after = None

    def read(self, chunk, frames):
        if self.before is None and chunk.start <= self.index < chunk.stop:
            self.before = frames[self.index - chunk.start].clone()

    def written(self, frames):
        if self.after is None and self.written_count <= self.index < self.written_count + len(frames):
            self.after = frames[self.index - self.written_count].detach().to("cpu", copy=True)
        self.written_count += len(frames)

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
                io.Model.Input("model", tooltip="The Wan DiT with an adapter from 'Attach State-Aware Adapter', or an "
                                                "InfVSR model from 'Load InfVSR Model' (then connect reference)."),
                io.Vae.Input("vae", tooltip="The Wan VAE matching the DiT: it encodes the LR frames, and decodes "
                                            "unless a decoder is plugged in."),
                io.Vae.Input("decoder", optional=True,
                             tooltip="Optional faster decoder of the same latents, from Load VAE: taew2_1 / "
                                     "lighttaew2_1 / lightvaew2_1 for Wan2.1, taew2_2 / lighttaew2_2 for Wan2.2. "
                                     "Encoding stays on the Wan VAE (README: which decoder to pick)."),
                io.Custom(REFERENCE_TYPE).Input(
                    "reference", optional=True,
                    tooltip="Only with an InfVSR model ('Load InfVSR Model'): its reference encoder, from 'Load InfVSR "
                            "Reference Encoder'. The run then streams InfVSR's way: one step per chunk of 9, then 12 "
                            "frames, with the previous chunk's attention keys and the VAE's causal cache carried over "
                            "(reset at scene cuts); steps, shift, start, seed, chunk, overlap and tile settings do "
                            "not apply."),
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
                crf, decoder=None, reference=None) -> io.NodeOutput:
        check_output_prefix(filename_prefix)
        options = StreamOptions(scale=scale, steps=steps, shift=shift, start=start, start_sigma=start_sigma, seed=seed,
                                chunk_frames=chunk_frames, overlap_frames=overlap_frames,
                                scene_cut_threshold=scene_cut_threshold, dit_tile=dit_tile, decode_tile=decode_tile,
                                colour=colour, crf=crf)
        job = StreamUpscale(model, vae, VideoReader(source_path(video)), options, decoder=decoder,
                            reference=reference)
        (log.warning if job.sizes.warnings else log.info)("%s", job.sizes.describe())
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, folder_paths.get_output_directory(), job.out_w, job.out_h)
        file = f"{name}_{counter:05}_.mp4"
        path = os.path.join(folder, file)
        middle = MiddleFrame(job.reader.frame_count // 2)
        progress = ChunkProgress(job, getattr(cls.hidden, "unique_id", None))
        job.run(path, on_scan=progress.scanning, on_plan=progress.planned, on_chunk=progress, on_read=middle.read,
                on_write=middle.written, check_interrupt=check_interrupt)
        shown = ui.PreviewVideo([ui.SavedResult(file, subfolder, io.FolderType.output)]).as_dict()
        compare = middle.ui_entry()
        if compare is not None:
            shown[COMPARE_UI_KEY] = [compare]
        return io.NodeOutput(path, ui=shown)
