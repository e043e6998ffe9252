"""Issue 13: `make demo` stopped by a signal while its server runs, and the harness's server when the process that
started it is SIGKILLed, leave nothing behind: no server process, no temporary base folder, no output file."""
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, make_env

STARTING = r"\[demo\] starting ComfyUI \(log: (.+)\) \.\.\.$"  # the log lies in the temporary base folder
UP = r"\[demo\] ComfyUI up after"


class Lines:
    """A child's output read on a thread (so the child never blocks on a full pipe), waited for line by line."""

    def __init__(self, proc):
        self.seen, self._queue = [], queue.Queue()
        threading.Thread(target=self._pump, args=(proc.stdout,), daemon=True).start()

    def _pump(self, stream):
        for line in stream:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)  # end of output

    def wait_for(self, pattern, timeout):
        """The match of the first line not read yet that matches `pattern`; fails at the deadline or the end."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
            found = re.search(pattern, line)
            if found:
                return found
        pytest.fail(f"no line matching {pattern!r} within {timeout} s:\n{self.text()}")

    def text(self):
        """The last lines printed so far."""
        while not self._queue.empty():
            line = self._queue.get_nowait()
            if line is not None:
                self.seen.append(line)
        return "\n".join(self.seen[-40:])


def live_processes():
    """pid -> (process group, command line) of every process that is not a zombie (a zombie runs nothing)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue  # it ended meanwhile
        if state != "Z":
            found[int(stat.parent.name)] = (int(group), cmdline)
    return found


def leftovers(group, marker):
    """Live processes of process group `group` or with `marker` (a server's base folder) in their command line."""
    return [f"{pid}: {cmdline}" for pid, (pgid, cmdline) in live_processes().items()
            if pgid == group or marker in cmdline]


def wait_until(condition, timeout):
    """Polls `condition()` until it is true (returned) or the deadline passes (its last value returned)."""
    deadline = time.monotonic() + timeout
    while not (result := condition()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return result


def from_a_terminal():
    """preexec_fn: Ctrl-C and hang-up as a terminal delivers them, even where this test runs with them ignored."""
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


def in_the_background():
    """preexec_fn: as `make demo &` in a script starts it, with SIGINT ignored (inherited by what it starts)."""
    from_a_terminal()
    signal.signal(signal.SIGINT, signal.SIG_IGN)


CLEAN_UP_SECONDS = 15  # stop() SIGKILLs a server that ignores its SIGINT after 20 s: slower means that happened


@pytest.mark.timeout(240)
@pytest.mark.parametrize("signum, when, started", [
    (signal.SIGTERM, "up", from_a_terminal), (signal.SIGTERM, "up", in_the_background),
    (signal.SIGINT, "up", from_a_terminal), (signal.SIGHUP, "up", from_a_terminal),
    (signal.SIGTERM, "starting", from_a_terminal)],
    ids=["SIGTERM", "SIGTERM-background", "SIGINT", "SIGHUP", "SIGTERM-while-starting"])
def test_make_demo_stopped_by_a_signal_leaves_nothing(tmp_path, test_clip, signum, when, started):
    """The signal goes to make's whole process group (as `timeout`, CI or Ctrl-C send it) while the prompt runs
    ("up") or while ComfyUI is still starting; the server, in its own session, gets none of it. make waits for the
    clean-up (its recipe execs the tool), which takes seconds."""
    out = tmp_path / "demo.mp4"
    t0 = time.monotonic()
    make = subprocess.Popen(["make", "--no-print-directory", "-C", str(REPO), "demo", f"INPUT={test_clip}",
                             f"OUTPUT={out}", "SCALE=2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=make_env(), start_new_session=True, preexec_fn=started)
    lines = Lines(make)
    try:
        base = Path(lines.wait_for(STARTING, 150).group(1)).parent
        server = f"--base-directory {base}"
        if when == "up":
            lines.wait_for(UP, 150)
        else:
            assert wait_until(lambda: leftovers(None, server), 60), f"no server process started:\n{lines.text()}"
        os.killpg(make.pid, signum)
        signalled = time.monotonic()
        make.wait(90)
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
            make.wait()
    took = time.monotonic() - signalled
    print(f"make demo: {signal.Signals(signum).name} ({when}) {signalled - t0:.0f} s in, make gone {took:.1f} s later")
    left = leftovers(make.pid, server)
    assert not left, f"still running after make exited: {left}\n{lines.text()}"
    assert make.returncode != 0, lines.text()
    assert took < CLEAN_UP_SECONDS, f"the clean-up took {took:.0f} s:\n{lines.text()}"
    assert when == "up" or not re.search(UP, lines.text()), "the server came up before the signal: not this case"
    assert not base.exists(), f"temporary base folder left behind: {sorted(p.name for p in base.iterdir())}"
    assert not list(tmp_path.iterdir()), "output (or a partial/hidden temporary file) left behind"


HOLDER = """
import sys, time
from tools import comfy_server
server = comfy_server.ComfyServer(sys.argv[1]).start()
print("server", server.proc.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.timeout(180)
def test_server_dies_with_the_process_that_started_it(tmp_path):
    """SIGKILL leaves no `finally` to run: the kernel must end the server (PR_SET_PDEATHSIG)."""
    base = tmp_path.resolve()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(base)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = Lines(holder)
    try:
        server_pid = lines.wait_for(r"^server (\d+)$", 150).group(1)
    finally:
        holder.kill()
        holder.wait()
    t0 = time.monotonic()
    wait_until(lambda: not leftovers(None, str(base)), 5)
    print(f"server {server_pid}: {time.monotonic() - t0:.1f} s after its parent was killed")
    left = leftovers(None, str(base))
    assert not left, f"the server outlived its parent: {left}\n{lines.text()}"
