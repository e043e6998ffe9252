"""Several processes (torchrun) share one video: contiguous chunk ranges, rank 0 stitches and writes.

Carried state chains each chunk to the one before, so ranges start on segment boundaries, where the carried state
restarts in a single process too (`segment_chunks`); the output is then the same for any number of processes.
Ranks other than 0 hand their finished chunks over through files in a shared folder (safetensors, renamed into
place when complete), so no rank holds more than a chunk in memory while rank 0 is still busy with its own range.
"""
import math
import os
import time

from safetensors.torch import load_file, save_file

from .stream import process_chunks
from .temporal import Stitcher


def rank_ranges(num_chunks, segment_chunks, world_size):
    """Contiguous [start, stop) chunk ranges per rank, cut on segment boundaries, as even as segments allow."""
    if segment_chunks < 1:
        raise ValueError("sharing a video between processes needs segment_chunks >= 1")
    segments = math.ceil(num_chunks / segment_chunks)
    bounds = [min(num_chunks, round(segments * rank / world_size) * segment_chunks) for rank in range(world_size + 1)]
    return [(bounds[rank], bounds[rank + 1]) for rank in range(world_size)]


def _chunk_file(folder, index):
    return os.path.join(folder, f"chunk_{index:06d}.safetensors")


def hand_over(folder, index, frames):
    final = _chunk_file(folder, index)
    save_file({"frames": frames.contiguous().cpu()}, final + ".partial")
    os.replace(final + ".partial", final)


def take_over(folder, index, is_alive=lambda: True, poll_seconds=0.2):
    """Waits for chunk `index` from another rank, loads it and deletes the file."""
    path = _chunk_file(folder, index)
    while not os.path.exists(path):
        if not is_alive():
            raise RuntimeError(f"chunk {index} never arrived: another process stopped")
        time.sleep(poll_seconds)
    frames = load_file(path)["frames"]
    os.remove(path)
    return frames


def upscale_shared(chunks, rank, world_size, segment_chunks, read_chunks, process, write, exchange_folder,
                   on_chunk=None, is_alive=lambda: True, remember=None):
    """This rank's part of a shared upscale. `read_chunks(indices)` yields those chunks' LR frames; `write` is
    only called on rank 0, with finished frames in video order; `process` and `remember` as for process_chunks."""
    start, stop = rank_ranges(len(chunks), segment_chunks, world_size)[rank]
    own = range(start, stop)
    finished = process_chunks(chunks, own, read_chunks(own), process, on_chunk, segment_chunks, remember)
    if rank != 0:
        for index, frames in finished:
            hand_over(exchange_folder, index, frames)
        return
    stitcher = Stitcher(chunks)
    for _, frames in finished:
        write(stitcher.push(frames))
    for index in range(stop, len(chunks)):
        write(stitcher.push(take_over(exchange_folder, index, is_alive)))
