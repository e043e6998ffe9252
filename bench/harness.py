"""What every benchmark section shares: the section registry, run metadata, measured child processes, the
peak-memory probe the workers use, the repeat policy that decides when a timing can be trusted, and the machine
probes (matmul peak, memory bandwidth) a step's FLOP rate is read against.

A section runs in this process and measures in child processes: either a whole tool run (`run_measured`, peak RSS
from os.wait4) or a worker (`run_worker`): `python -m bench.run --worker NAME` runs one registered worker function in a
fresh interpreter, with glibc told to hand freed blocks back at once, and prints its result as one JSON line.
"""
import ctypes
import gc
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median

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
    """Registers `function(config dict) -> result dict`, run by `python -m bench.run --worker NAME` in a fresh
    process."""
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


def command_line():
    """How this run was started, as typed in the repository root: `python -m bench.run --full ...`."""
    return shlex.join([Path(sys.executable).name, "-m", sys.modules["__main__"].__spec__.name, *sys.argv[1:]])


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
    command = [sys.executable, "-m", "bench.run", "--worker", name, "--worker-config", json.dumps(config)]
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
    from tools import comfy_env

    comfy_env.setup()
    result = WORKERS[name](json.loads(config_json))
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# --- peak memory of one call (inside a worker) -------------------------------------------------------------------

def _status_bytes(field):
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(field + ":"))


def timed(function, device, clock=time.perf_counter):
    """(function's result, seconds), with the device's queued work finished on both sides (CUDA runs async)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = clock()
    result = function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, clock() - started


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


# --- repeats: how many, which statistic, and when to trust them -------------------------------------------------

# Another job on the machine only ever adds time to a repeat (it takes the core, the caches, the memory bandwidth,
# the clock), never removes it, so the fastest repeat is the closest to what the work costs undisturbed: a timing's
# statistic is its minimum. A median needs most repeats undisturbed; the minimum needs a few. One fast repeat could
# still be a fluke, so the minimum counts only when it is reproduced: the CONFIRM fastest repeats must agree within
# the spread limit. Memory is not taken by a neighbour: its statistic stays the median, its spread that of all.
CONFIRM = 3
# 20 %: on this project's 2-core VM an idle machine alone spreads the fastest three of nine 4-s rounds by up to 18 %
# (measured); a tighter bar withholds every figure there. The FLOP check (overhead.plausible) still refuses a
# disturbed ratio this bar lets through, and a loaded machine (the 17.1/14.8/7.8 s: 2.19) is far above it.
STABLE_SPREAD = 1.20
STATISTICS = ("min", "median")


@dataclass(frozen=True)
class RepeatPolicy:
    """How long a measured set repeats: `min_repeats` rounds, then more until every measurement in it is stable,
    but never more than `max_repeats` rounds, and no new round once `max_seconds` have gone by."""
    min_repeats: int = 3
    max_repeats: int = 9
    max_seconds: float = 900.0
    spread_limit: float = STABLE_SPREAD

    def to_dict(self):
        return asdict(self)

    def describe(self):
        return (f"{self.min_repeats} to {self.max_repeats} repeats until the fastest {CONFIRM} agree within "
                f"{100 * (self.spread_limit - 1):.0f} % (no new round after {self.max_seconds:.0f} s)")


def repeat_policy(args):
    """The policy bench/run.py's options ask for."""
    return RepeatPolicy(min_repeats=args.repeats, max_repeats=args.max_repeats, max_seconds=args.repeat_seconds,
                        spread_limit=args.spread_limit)


def spread(values, statistic):
    """Largest / smallest of the repeats the statistic rests on: the CONFIRM fastest for "min", all for "median"."""
    ordered = sorted(values)
    if statistic == "min":
        ordered = ordered[:CONFIRM]
    low, high = ordered[0], ordered[-1]
    if high == low:
        return 1.0
    return high / low if low > 0 else math.inf


def summarize(values, statistic="min", limit=STABLE_SPREAD):
    """One measured set: every repeat, the statistic's value, its spread and the verdict. Stable: at least CONFIRM
    repeats, spread within `limit`."""
    if statistic not in STATISTICS:
        raise ValueError(f"unknown statistic {statistic!r}; known: {STATISTICS}")
    width = spread(values, statistic)
    value = min(values) if statistic == "min" else median(values)
    return {"repeats": list(values), "statistic": statistic, "value": value, "spread": round(width, 3),
            "stable": len(values) >= CONFIRM and width <= limit}


def summarize_records(records, statistics, limit=STABLE_SPREAD):
    """{name: {key: summarize(...)}} of `repeat_until_settled`'s records, for each key of `statistics`
    (measurement key -> statistic)."""
    return {name: {key: summarize([record[key] for record in rows], statistic, limit)
                   for key, statistic in statistics.items()} for name, rows in records.items()}


def verdict(summaries):
    """A figure's trust: the worst spread of the measured sets it is computed from, and stable only if all are."""
    summaries = list(summaries)
    return {"spread": max(s["spread"] for s in summaries), "stable": all(s["stable"] for s in summaries)}


def repeat_until_settled(calls, policy, statistics, clock=time.monotonic):
    """Runs every call (name -> function returning a dict of measurements) once per round, interleaved so that a
    slower moment of the machine hits all of them, for as many rounds as `policy` allows and needs; returns
    {name: [record per round]}."""
    records = {name: [] for name in calls}
    started = clock()
    for rounds in range(1, policy.max_repeats + 1):
        for name, call in calls.items():
            records[name].append(call())
        if rounds < policy.min_repeats:
            continue
        summaries = summarize_records(records, statistics, policy.spread_limit)
        if all(s["stable"] for sets in summaries.values() for s in sets.values()):
            break
        if clock() - started >= policy.max_seconds:
            break
    return records


PUBLISHED_META = ("spread", "stable", "unpublished")  # the keys `publish` adds beside the figures


def figures_of(published):
    """The figures of a `publish` result (or of a plain dict of figures), without its verdict keys."""
    return {name: value for name, value in published.items() if name not in PUBLISHED_META}


def publish(values, verdicts, digits=3):
    """Headline figures: each value only where its verdict is stable and not refused by a plausibility check
    (None otherwise: such a figure is never a headline), with every figure's spread and verdict; the withheld values
    are kept under "unpublished"."""
    trusted = {name: verdicts[name]["stable"] and verdicts[name].get("plausible") is not False for name in values}
    figures = {name: round(value, digits) if trusted[name] else None for name, value in values.items()}
    figures["spread"] = {name: verdicts[name]["spread"] for name in values}
    figures["stable"] = {name: verdicts[name]["stable"] for name in values}
    withheld = {name: round(value, digits) for name, value in values.items() if not trusted[name]}
    if withheld:
        figures["unpublished"] = withheld
    return figures


# --- machine probes: matmul peak and memory bandwidth, in the run that uses them --------------------------------

PEAK_ROWS = 4096  # [4096, d] x [d, d]: about d / 4 FLOP per byte moved, above any machine's balance at d >= 1536
COPY_BYTES = 512 << 20  # far larger than any last-level cache, so the copy streams from memory
PROBE_SECONDS = 0.2  # one probe repeat: long enough for the timer, short beside a DiT step


def rate_call(operation, device, seconds=PROBE_SECONDS, clock=time.perf_counter):
    """A measuring call for repeat_until_settled: `operation` run back to back for about `seconds`; its record is
    the seconds per run."""
    _, once = timed(operation, device, clock)  # warm-up, and how many runs fill `seconds`
    count = max(1, math.ceil(seconds / max(once, 1e-6)))

    def measure():
        _, total = timed(lambda: [operation() for _ in range(count)], device, clock)
        return {"seconds": total / count}

    return measure


def machine_probes(width, dtype, device):
    """(measuring calls, work per run) for the machine's matmul peak at `width` in `dtype` (a plain product the
    size of a DiT linear layer with many tokens) and its memory bandwidth (a float32 copy, read + write)."""
    import torch

    a = torch.randn(PEAK_ROWS, width, device=device).to(dtype)
    b = torch.randn(width, width, device=device).to(dtype)
    product = torch.empty(PEAK_ROWS, width, dtype=dtype, device=device)
    source = torch.ones(COPY_BYTES // 4, device=device)
    target = torch.empty_like(source)
    calls = {"matmul": rate_call(lambda: torch.mm(a, b, out=product), device),
             "copy": rate_call(lambda: target.copy_(source), device)}
    work = {"matmul": {"flops": 2 * PEAK_ROWS * width * width, "rows": PEAK_ROWS, "width": width,
                       "dtype": str(dtype).replace("torch.", "")},
            "copy": {"bytes": 2 * COPY_BYTES}}
    return calls, work


def measured_probes(records, work, limit=STABLE_SPREAD):
    """Each probe's work per run with the summary of its seconds per run (fastest repeat: see CONFIRM)."""
    summaries = summarize_records(records, {"seconds": "min"}, limit)
    return {name: {**work[name], **summaries[name]["seconds"]} for name in work}


def probe_rates(probes):
    """Peak matmul FLOP/s and memory bytes/s from `measured_probes`."""
    return {"matmul_flops_per_second": probes["matmul"]["flops"] / probes["matmul"]["value"],
            "bytes_per_second": probes["copy"]["bytes"] / probes["copy"]["value"]}


# --- deliberate interference ------------------------------------------------------------------------------------

BUSY_JOB = "import torch\ntorch.set_num_threads(1)\na = torch.randn(1024, 1024)\nwhile True:\n    a @ a\n"


@contextmanager
def busy_load(processes):
    """`processes` single-threaded matmul loops running for the duration: another job on the machine, on purpose,
    to see how a section's repeats and verdicts behave under it (bench/run.py --load N)."""
    jobs = [subprocess.Popen([sys.executable, "-c", BUSY_JOB], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(processes)]
    try:
        yield [job.pid for job in jobs]
    finally:
        for job in jobs:
            job.kill()
        for job in jobs:
            job.wait()
