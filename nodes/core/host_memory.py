"""Free host RAM as this process sees it: the OS's available memory, capped by a container's cgroup limit.

The one part of the memory planner that asks the machine; callers pass the result to `memory_plan.plan` as the
host budget.
"""
import os

from .memory import KiB


def _read_int(path):
    try:
        with open(path) as handle:
            text = handle.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def host_available_bytes():
    """RAM this process can still use: psutil's `available` (or /proc/meminfo MemAvailable), capped by the
    cgroup memory limit when the process runs in a container."""
    available = None
    try:
        import psutil

        available = int(psutil.virtual_memory().available)
    except Exception:  # psutil missing or unusable
        try:
            with open("/proc/meminfo") as handle:
                for line in handle:
                    if line.startswith("MemAvailable:"):
                        available = int(line.split()[1]) * KiB
                        break
        except OSError:
            pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            available = 0
    for limit_path, usage_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_path), _read_int(usage_path)
        if limit is not None and usage is not None and limit < (1 << 60):
            available = min(available, max(0, limit - usage))
    return available

