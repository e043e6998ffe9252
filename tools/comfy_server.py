"""A real headless ComfyUI with this pack loaded: base directory, start/stop, and an API-format prompt client.

Used by the server tests (one server per session), `make demo` (run one prompt, headless) and `make serve`
(the same server for a browser). Standard library + `websocket-client`; no ComfyUI import in this process.
A server never outlives the process that started it (stop(), and the kernel where that process is killed), and
`exit_on_signals()`, which every tool calls first, makes SIGTERM and SIGHUP clean up as Ctrl-C does.

    python -m tools.comfy_server --base-directory DIR [--port N] [--prompt graph_api.json]
"""
import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACK_NAME = "ComfyUI-LiteVSR"  # folder name of the pack inside custom_nodes/ (what --whitelist-custom-nodes matches)
# vae_approx: where the stock Load VAE reads the tiny decoders lighttaew2_1 / lighttaew2_2 (taew2_* sit in vae);
# infvsr: InfVSR's reference encoder files (RAM, DAPE), the pack's own folder
MODEL_FOLDERS = ("diffusion_models", "vae", "vae_approx", "litevsr", "infvsr")


class ComfyError(RuntimeError):
    """A prompt was rejected or failed; str() is a one-line reason."""


def comfy_dir():
    """ComfyUI source tree: $COMFYUI_PATH, else the repo's `.comfyui` link made by tools/bootstrap_env.sh."""
    return Path(os.environ.get("COMFYUI_PATH") or REPO / ".comfyui").resolve()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_base(base, models_dir=None):
    """Create a ComfyUI base directory: custom_nodes/ComfyUI-LiteVSR -> repo, models/<each of MODEL_FOLDERS>,
    input/, output/. With `models_dir` (a folder holding diffusion_models/, vae/, litevsr/, maybe vae_approx/ and
    infvsr/), an extra_model_paths.yaml pointing at it is written and its path returned (pass it to ComfyServer)."""
    base = Path(base).resolve()
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_NAME
    if link.is_symlink() or link.exists():
        if link.resolve() != REPO:
            link.unlink()
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    for sub in MODEL_FOLDERS:
        (base / "models" / sub).mkdir(parents=True, exist_ok=True)
    for sub in ("input", "output", "temp", "user"):
        (base / sub).mkdir(exist_ok=True)
    if models_dir is None:
        return None
    models_dir = Path(models_dir).resolve()
    yaml_path = base / "extra_model_paths.yaml"
    lines = ["litevsr_models:", f"  base_path: {json.dumps(str(models_dir))}"]
    lines += [f"  {sub}: {sub}" for sub in MODEL_FOLDERS]
    yaml_path.write_text("\n".join(lines) + "\n")
    return yaml_path


def place_file(src, dst):
    """Copy `src` to `dst` (models and clips put into the base directory), replacing what is there."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    shutil.copyfile(src, dst)
    return dst


def _use_cpu():
    try:
        import torch
    except ImportError:
        return True
    return not torch.cuda.is_available()


def one_line(text, limit=400):
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


EXIT_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def exit_on_signals():
    """For a tool's main thread (before it starts a server or makes temporary files): SIGTERM and SIGHUP (`timeout`,
    CI, a process manager, a closed terminal) end the process the way Ctrl-C does, as SystemExit(128 + signal)
    raised where it runs, so `finally` blocks and context managers stop the server and delete temporary folders and
    partial files. Python's default for them is to die on the spot, skipping all of that. Repeats are ignored from
    then on, so they cannot cut the clean-up short: make passes its own SIGTERM on to the recipe it waits for."""
    def leave(signum, frame):
        for repeat in EXIT_SIGNALS:
            signal.signal(repeat, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    for signum in EXIT_SIGNALS:
        signal.signal(signum, leave)


def _server_preexec():
    """preexec_fn for the server. Its SIGINT at the default: stop() relies on it, and a tool started in the background
    (`make demo &` in a script) would hand it on ignored. On Linux the kernel also SIGKILLs the server when the thread
    that started it ends, however that happens: a SIGKILLed or crashed tool runs no `finally` to stop it. (So start
    servers from a thread that lives as long as they should: the main thread.)"""
    prctl = None
    if sys.platform.startswith("linux"):
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork: the child only calls it
        death_signal = ctypes.c_ulong(signal.SIGKILL)
    parent = os.getpid()

    def preexec():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, death_signal)
            if os.getppid() != parent:  # the parent died before prctl: no death signal will come
                os.kill(os.getpid(), signal.SIGKILL)

    return preexec


class ComfyServer:
    """`with ComfyServer(base) as server: paths = server.run_prompt(api_graph)`."""

    def __init__(self, base, port=None, listen="127.0.0.1", extra_model_paths=None, cpu=None, log_path=None,
                 python=None):
        self.base = Path(base).resolve()
        self.port = port or free_port()
        self.listen = listen
        self.extra_model_paths = extra_model_paths
        self.cpu = _use_cpu() if cpu is None else cpu
        self.log_path = Path(log_path) if log_path else self.base / "comfyui.log"
        self.python = python or sys.executable
        self.proc = None
        self._log = None
        self.node_seconds = {}
        self.client_id = uuid.uuid4().hex

    # --- lifecycle -----------------------------------------------------------------------------------------------
    @property
    def url(self):
        host = "127.0.0.1" if self.listen in ("0.0.0.0", "::") else self.listen
        return f"http://{host}:{self.port}"

    def command(self):
        cmd = [self.python, "main.py", "--listen", self.listen, "--port", str(self.port),
               "--base-directory", str(self.base), "--database-url", "sqlite:///:memory:",
               "--disable-api-nodes", "--disable-auto-launch",
               "--disable-all-custom-nodes", "--whitelist-custom-nodes", PACK_NAME]
        if self.cpu:
            # On the CPU ComfyUI defaults to its sub-quadratic attention, far slower than torch's SDPA.
            cmd += ["--cpu", "--use-pytorch-cross-attention"]
        if self.extra_model_paths:
            cmd += ["--extra-model-paths-config", str(self.extra_model_paths)]
        return cmd

    def start(self, timeout=240, log_to_console=False):
        prepare_base(self.base)
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
        if log_to_console:
            out = None
        else:
            self._log = open(self.log_path, "ab")
            out = self._log
        # Its own session: a Ctrl-C in the terminal reaches only this process, which stops the server in order.
        self.proc = subprocess.Popen(self.command(), cwd=comfy_dir(), env=env, stdout=out,
                                     stderr=subprocess.STDOUT if out else None, start_new_session=True,
                                     preexec_fn=_server_preexec())
        try:
            self._wait_until_up(timeout)
        except BaseException:  # it failed, or Ctrl-C / SIGTERM came while it started: no server left behind
            self.stop()
            raise
        return self

    def _wait_until_up(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ComfyError(f"ComfyUI exited at start-up (code {self.proc.returncode}); "
                                 f"log: {self.log_path}: {one_line(self.log_tail(3))}")
            try:
                self.get("/system_stats", timeout=2)
                return
            except (OSError, urllib.error.URLError):
                time.sleep(0.5)
        raise ComfyError(f"ComfyUI did not answer /system_stats within {timeout} s; log: {self.log_path}")

    def stop(self, timeout=20):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # its own session: only the server and its children
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self._log:
            self._log.close()
            self._log = None

    def __enter__(self):
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def log_tail(self, lines=40):
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # --- HTTP ----------------------------------------------------------------------------------------------------
    def get(self, path, timeout=30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read() or b"null")

    def post(self, path, payload, timeout=30):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read() or b"null")

    def object_info(self, node=None):
        return self.get("/object_info" + (f"/{node}" if node else ""))

    # --- prompts -------------------------------------------------------------------------------------------------
    def queue(self, prompt):
        """POST /prompt; returns the prompt id, or raises ComfyError with the validation errors in one line."""
        try:
            return self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})["prompt_id"]
        except urllib.error.HTTPError as e:
            body = e.read().decode(errors="replace")
            try:
                raise ComfyError(format_rejection(json.loads(body))) from None
            except json.JSONDecodeError:
                raise ComfyError(one_line(f"prompt rejected (HTTP {e.code}): {body}")) from None

    def run_prompt(self, prompt, timeout=600, on_progress=None):
        """Queue an API-format graph, wait for it, return the absolute paths of the files its output nodes saved.

        `on_progress(text)` receives a line whenever a node starts and on its progress updates."""
        import websocket

        ws = websocket.create_connection(f"ws://{self.url.split('://', 1)[1]}/ws?clientId={self.client_id}",
                                         timeout=timeout)
        self.node_seconds = {}  # node id -> wall seconds, from the websocket "executing" messages
        current, since = None, time.monotonic()
        try:
            prompt_id = self.queue(prompt)
            deadline = time.monotonic() + timeout
            while True:
                ws.settimeout(max(1.0, deadline - time.monotonic()))
                try:
                    raw = ws.recv()
                except websocket.WebSocketTimeoutException:
                    self.post("/interrupt", {})
                    raise ComfyError(f"prompt {prompt_id} did not finish within {timeout} s") from None
                if self.proc is not None and self.proc.poll() is not None:
                    raise ComfyError(f"ComfyUI exited while running the prompt; log: {self.log_path}")
                if not isinstance(raw, str):
                    continue  # binary previews
                msg = json.loads(raw)
                data = msg.get("data") or {}
                if data.get("prompt_id") != prompt_id:
                    continue
                kind = msg.get("type")
                if kind == "executing":
                    now = time.monotonic()
                    if current is not None:
                        self.node_seconds[current] = self.node_seconds.get(current, 0.0) + now - since
                    current, since = data.get("node"), now
                    if on_progress is not None and current is not None:
                        on_progress(f"node {current} ({prompt.get(current, {}).get('class_type', '?')})")
                if kind == "progress" and on_progress is not None:
                    on_progress(f"node {data.get('node')}: {data.get('value')}/{data.get('max')}")
                if kind == "execution_success":  # may come before the final "executing": close the last node
                    if current is not None:
                        self.node_seconds[current] = self.node_seconds.get(current, 0.0) + time.monotonic() - since
                    break
                if kind == "execution_error":
                    raise ComfyError(one_line(
                        f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                        f"{data.get('exception_type', 'Error')}: {data.get('exception_message', '').strip()}"))
                if kind == "execution_interrupted":
                    raise ComfyError(f"prompt {prompt_id} was interrupted")
        finally:
            ws.close()
        return self.output_files(self.wait_history(prompt_id))

    def wait_history(self, prompt_id, timeout=30):
        """/history is written after the last websocket message: poll until the entry appears."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry:
                return entry
            time.sleep(0.1)
        raise ComfyError(f"no /history entry for prompt {prompt_id} after {timeout} s")

    def output_files(self, entry):
        roots = {"output": self.base / "output", "temp": self.base / "temp", "input": self.base / "input"}
        paths = []
        for node_out in (entry.get("outputs") or {}).values():
            for items in node_out.values():
                for item in items if isinstance(items, list) else []:
                    if isinstance(item, dict) and "filename" in item and item.get("type") == "output":
                        paths.append(roots["output"] / item.get("subfolder", "") / item["filename"])
        return paths


def format_rejection(body):
    """One line from a /prompt HTTP 400 body: {"error": {...}, "node_errors": {id: {"errors": [...], ...}}}."""
    parts = []
    for node_id, info in (body.get("node_errors") or {}).items():
        for err in info.get("errors", []):
            detail = err.get("details") or err.get("message", "")
            parts.append(f"node {node_id} ({info.get('class_type')}): {err.get('message', '')}: {detail}")
    if not parts:
        err = body.get("error") or {}
        parts.append(f"{err.get('message', 'prompt rejected')}: {err.get('details', '')}")
    return one_line("prompt rejected: " + "; ".join(parts))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base-directory", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--listen", default="127.0.0.1")
    ap.add_argument("--models-dir", help="folder with diffusion_models/, vae/, litevsr/, infvsr/ (extra model paths)")
    ap.add_argument("--prompt", help="API-format graph to run; without it the server runs until Ctrl-C")
    args = ap.parse_args(argv)
    yaml_path = prepare_base(args.base_directory, args.models_dir)
    server = ComfyServer(args.base_directory, port=args.port or None, listen=args.listen,
                         extra_model_paths=yaml_path)
    try:
        server.start(log_to_console=not args.prompt)
        if args.prompt:
            for p in server.run_prompt(json.loads(Path(args.prompt).read_text())):
                print(p)
        else:
            print(f"ComfyUI with {PACK_NAME}: {server.url}  (Ctrl-C to stop)", flush=True)
            server.proc.wait()
    except ComfyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    exit_on_signals()
    sys.exit(main())
