"""What every benchmark section shares: the section registry, run metadata, measured child processes, and the
peak-memory probe the workers use.

A section runs in this process and measures in child processes: either a whole tool run (`run_measured`, peak RSS
from os.wait4) or a worker (`run_worker`): `bench/run.py --worker NAME` runs one registered worker function in a
fresh interpreter, with glibc told to hand freed blocks back at once, and prints its result as one JSON line.
"""
import ctypes
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "bench" / ".cache"
RESULT_PREFIX = "BENCH_RESULT "

SECTIONS = {}
WORKERS = {}


def section(name):
    """Registers `function(args) -> (result dict, ok bool, headline dict)`; the headline's keys become top-level
    keys of latest.json (the figures the README prints)."""
    def register(function):
        SECTIONS[name] = function
        return function

    return register


def worker(name):
    """Registers `function(config dict) -> result dict`, run by `bench/run.py --worker NAME` in a fresh process."""
    def register(function):
        WORKERS[name] = function
        return function

    return register


# --- run metadata -----------------------------------------------------------------------------------------------

def git_commit():
    def git(*args):
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(dirty) if dirty is not None else None}


def machine():
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    total = proc_meminfo("MemTotal")
    return {"cpu": cpu, "cores": os.cpu_count(), "cores_usable": usable,
            "ram_gib": round(total / 2 ** 30, 1) if total else None, "os": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def proc_meminfo(field):
    """A /proc/meminfo field in bytes (None where there is no /proc)."""
    try:
        with open("/proc/meminfo") as handle:
            return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


def table(headers, rows):
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(row) for row in rows])


# --- measuring a child process ----------------------------------------------------------------------------------

# glibc otherwise keeps freed blocks (and raises its mmap threshold after each large free), so RSS would stay at
# the first repeat's peak and later repeats would measure nothing.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def run_measured(command, log_path, timeout=None, env=None):
    """Runs `command` to completion; returns (exit code, wall seconds, peak RSS in bytes of that process and the
    children it waited for). os.wait4 gives this child's own rusage, unlike RUSAGE_CHILDREN, which keeps the
    largest of every child this process ever waited for."""
    with open(log_path, "w") as log:
        started = time.monotonic()
        proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1", **(env or {})))
        deadline = None if timeout is None else started + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        seconds = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    return proc.returncode, seconds, usage.ru_maxrss * 1024  # Linux reports KiB


def run_worker(name, config, log_path, timeout=None):
    """Runs worker `name` in a fresh process; returns its result dict. Raises with the log's tail on failure."""
    command = [sys.executable, str(REPO / "bench" / "run.py"), "--worker", name, "--worker-config",
               json.dumps(config)]
    code, seconds, peak = run_measured(command, log_path, timeout=timeout, env=ALLOCATOR_ENV)
    text = Path(log_path).read_text()
    lines = [line for line in text.splitlines() if line.startswith(RESULT_PREFIX)]
    if code != 0 or not lines:
        tail = "\n".join(text.strip().splitlines()[-15:])
        raise RuntimeError(f"bench worker {name} failed (exit code {code}, log {log_path}):\n{tail}")
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    result["process"] = {"seconds": round(seconds, 1), "peak_rss_mib": round(peak / 2 ** 20, 1)}
    return result


def serve_worker(name, config_json):
    """The child side of run_worker: ComfyUI set up in this process, the worker run, its result printed."""
    sys.path.insert(0, str(REPO / "tools"))
    import comfy_env

    comfy_env.setup()
    result = WORKERS[name](json.loads(config_json))
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# --- peak memory of one call (inside a worker) -------------------------------------------------------------------

def _status_bytes(field):
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(field + ":"))


def timed(function, device):
    """(function's result, seconds), with the device's queued work finished on both sides (CUDA runs async)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    result = function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - started


def peak_memory(function, device):
    """(function's result, seconds, peak bytes above the memory in use when it started).

    CUDA: the caching allocator's own peak (exact). CPU: VmHWM after the call minus VmRSS before it, the high-water
    mark reset through /proc/self/clear_refs (Linux >= 4.0); exact for the process under ALLOCATOR_ENV."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # VmHWM := current RSS
        base = _status_bytes("VmRSS")
    result, seconds = timed(function, device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _status_bytes("VmHWM")
    return result, seconds, peak - base
