"""Out-of-memory back-off: when a chunk runs out of memory after all, halve the size of the stage that failed and
redo the chunk with the new plan (a plan is memory_plan.py's: the sizes chosen for a run with their estimates).

Pure python/torch; imports nothing of ComfyUI (its OOM exception type is the caller's `is_oom`).
"""
import gc
from contextlib import contextmanager
from dataclasses import replace

import torch

from .geometry import TEMPORAL_STRIDE, round_up
from .memory_plan import (MIN_CHUNK_FRAMES, MIN_DECODE_TILE_PX, MIN_DIT_TILE, STAGE_LABEL, STAGES, Plan,
                          budget_warnings, round_down)

STAGE_ATTR = "litevsr_stage"


class PlanOutOfMemory(RuntimeError):
    """Raised by `run_with_oom_retry` when halving cannot make the run fit."""


def default_is_oom(exc):
    """torch.OutOfMemoryError (CUDA/XPU), MemoryError, and RuntimeErrors whose message says the allocator ran
    out (CPU "can't allocate memory", MPS "out of memory")."""
    oom_types = (MemoryError,) + tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                                   getattr(torch.cuda, "OutOfMemoryError", None)) if t)
    if isinstance(exc, oom_types):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


@contextmanager
def oom_stage(name):
    """Tags any exception leaving the block with the stage it came from ("dit", "decode", "encode", "chunk"),
    so `run_with_oom_retry` knows which size to halve. The innermost tag wins."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; use one of {STAGES}")
    try:
        yield
    except BaseException as exc:
        if getattr(exc, STAGE_ATTR, None) is None:
            try:
                setattr(exc, STAGE_ATTR, name)
            except (AttributeError, TypeError):
                pass
        raise


def stage_of(exc, plan: Plan = None):
    """The stage an exception came from: its `litevsr_stage` (set by `oom_stage`) or `stage` attribute, on it or
    on its cause/context; otherwise a host MemoryError is the chunk, and a device OOM the device stage with the
    largest estimate relative to the budget."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        for attr in (STAGE_ATTR, "stage"):
            stage = getattr(exc, attr, None)
            if stage in STAGES:
                return stage
        nxt = exc.__cause__ or exc.__context__
        if nxt is None:
            break
        exc = nxt
    if type(exc) is MemoryError or plan is None:
        return "chunk"
    return max(("dit", "decode", "encode"), key=lambda s: getattr(plan, f"{s}_bytes"))


def _halve_chunk(p: Plan):
    floor = MIN_CHUNK_FRAMES + p.options.overlap_frames
    new = max(floor, round_down((p.chunk_frames - 1) // 2, TEMPORAL_STRIDE) + 1)
    return None if new >= p.chunk_frames else ("chunk_frames", p.chunk_frames, new)


def _halve_dit_tile(p: Plan):
    lat_h, lat_w = p.latent_hw
    multiple = p.signature.patch_size[1]
    tile_h, tile_w = p.dit_tile
    floor_h, floor_w = min(lat_h, MIN_DIT_TILE), min(lat_w, MIN_DIT_TILE)
    if tile_h >= tile_w and tile_h > floor_h:  # halve the longer side: half the tokens
        new = (max(floor_h, round_down(tile_h // 2, multiple)), tile_w)
    elif tile_w > floor_w:
        new = (tile_h, max(floor_w, round_down(tile_w // 2, multiple)))
    elif tile_h > floor_h:
        new = (max(floor_h, round_down(tile_h // 2, multiple)), tile_w)
    else:
        return None
    return "dit_tile", tuple(p.dit_tile), new


def halved_decode_tile(tile_px, largest_side_px, stride):
    """The VAE tile side after an OOM: half the side actually decoded (the tile, at most the image's longer side),
    on the stride, not below MIN_DECODE_TILE_PX; None when it is at that floor already."""
    effective = min(tile_px, largest_side_px)
    floor = min(effective, round_up(MIN_DECODE_TILE_PX, stride))
    new = max(floor, round_down(effective // 2, stride))
    return None if new >= effective else new


def _halve_decode_tile(p: Plan):
    new = halved_decode_tile(p.decode_tile, max(p.decode_tile_hw_px), p.signature.vae_stride)
    return None if new is None else ("decode_tile", p.decode_tile, new)


def halve_for(stage, p: Plan):
    """(size name, old, new) for the size to halve after an OOM in `stage`, or None when nothing is left.
    DiT: the longer side of the DiT tile (half the tokens), then the chunk once the tile is at its floor (the
    DiT's memory is linear in the chunk's latent frames too). Decode/encode: the VAE tile side. Chunk: frames."""
    if stage == "dit":
        return _halve_dit_tile(p) or _halve_chunk(p)
    if stage in ("decode", "encode"):
        return _halve_decode_tile(p)
    return _halve_chunk(p)


def release_cached_memory():
    """Drop what the failed attempt left behind: Python garbage, then the CUDA caching allocator's free blocks."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_with_oom_retry(step_fn, plan: Plan, is_oom=default_is_oom, on_retry=print, max_retries=4,
                       release=release_cached_memory):
    """`step_fn(plan)`, retried with the offending size halved after each out-of-memory error.

    `is_oom(exc)` says whether an exception is an OOM (pass ComfyUI's `model_management.OOM_EXCEPTION` check on
    GPU; the default covers torch.OutOfMemoryError, MemoryError and allocator messages); any other exception
    propagates unchanged. The stage is read from the exception (`oom_stage` context manager inside step_fn, or a
    `stage` attribute), see `stage_of`. Each retry calls `on_retry(message)` with the new settings and the new
    plan's describe() line. Gives up with PlanOutOfMemory after `max_retries` retries, or at once when the
    offending size is already at its floor. Returns `(result, plan_used)`.

    The failed attempt's exception is dropped before `release()` and the retry, so its traceback does not pin
    the tensors of the failed attempt (as ComfyUI's VAE.decode fallback does). Wrap the smallest unit of work
    that can be redone as a whole (one chunk: sample, decode) and carry the returned plan on to the next chunk,
    so later chunks start from the sizes that worked.
    """
    attempts = []
    while True:
        failure = None
        try:
            return step_fn(plan), plan
        except Exception as exc:  # interrupts (BaseException) pass untouched; non-OOM errors are re-raised
            if not is_oom(exc):
                raise
            first_line = str(exc).splitlines()[0][:200] if str(exc) else "no message"
            failure = (stage_of(exc, plan), f"{type(exc).__name__}: {first_line}")
        release()
        stage, reason = failure
        attempts.append(plan.describe())
        change = halve_for(stage, plan)
        if change is None or len(attempts) > max_retries:
            why = ("every size it depends on is already at its minimum" if change is None
                   else f"gave up after {max_retries} retries")
            raise PlanOutOfMemory(
                f"LiteVSR ran out of memory in the {STAGE_LABEL.get(stage, stage)} ({reason}) and {why}. "
                f"Last settings: {plan.describe()}. Free memory (close other programs, unload other models, "
                f"start ComfyUI with --lowvram), lower the output resolution, or set smaller chunk_frames / "
                f"dit_tile / decode_tile by hand.")
        name, old, new = change
        plan = plan.with_sizes(**{name: new})
        plan = replace(plan, auto=tuple(a for a in plan.auto if a != name))
        plan = replace(plan, warnings=budget_warnings(plan))
        on_retry(f"LiteVSR: out of memory in the {STAGE_LABEL.get(stage, stage)} ({reason}); retry "
                 f"{len(attempts)}/{max_retries} with {name} {_fmt_size(old)} -> {_fmt_size(new)}. "
                 f"{plan.describe()}")


def _fmt_size(value):
    return "x".join(map(str, value)) if isinstance(value, tuple) else str(value)
