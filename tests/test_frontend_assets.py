"""The pack's front-end files on a real server (served, valid JavaScript, a help page for every node), the warning
rules of js/litevsr_rules.js run under node against the Python checks they mirror, and the progress-event
helper (nodes/progress.py)."""
import json
import shutil
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest

from tools import comfy_server
import workflows
from comfyui_litevsr.nodes import progress
from comfyui_litevsr.nodes.core import decode as core_decode
from comfyui_litevsr.nodes.core import dit_tiling, memory_plan
from comfyui_litevsr.nodes.core.dataset import VideoClipDataset, check_clip_frames
from comfyui_litevsr.nodes.core.degrade import DegradationConfig, with_overrides
from comfyui_litevsr.nodes.training_run import check_clip_geometry
from helpers import format_eta

JS = workflows.REPO / "js"
SCRIPTS = ("litevsr.js", "litevsr_rules.js")
BASE = f"/extensions/{comfy_server.PACK_NAME}"
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="node (Node.js) is not installed")


def get(comfy, path):
    with urllib.request.urlopen(comfy.url + path, timeout=30) as response:
        return response.status, response.headers.get("Content-Type", ""), response.read()


def pack_nodes(object_info):
    return {name: info for name, info in object_info.items() if info.get("category", "").split("/")[0] == "LiteVSR"}


# --- served files --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_is_served_and_listed(comfy, script):
    status, kind, body = get(comfy, f"{BASE}/{script}")
    assert status == 200 and "javascript" in kind, kind
    assert body == (JS / script).read_bytes()
    assert f"{BASE}/{script}" in comfy.get("/extensions")  # the front end imports every listed script


@needs_node
@pytest.mark.parametrize("script", SCRIPTS)
def test_script_parses(tmp_path, script, comfy):
    _, _, body = get(comfy, f"{BASE}/{script}")
    module = tmp_path / (script[:-3] + ".mjs")  # node reads .js as CommonJS; the front end loads ES modules
    module.write_bytes(body)
    result = subprocess.run([NODE, "--check", str(module)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_scripts_use_only_stable_frontend_imports():
    """No bundler, no CDN: the extension imports only the front end's app/api shims and its own rules module."""
    text = (JS / "litevsr.js").read_text()
    imports = sorted(line.split(" from ")[1].strip(' ";') for line in text.splitlines() if line.startswith("import "))
    assert imports == ["../../scripts/api.js", "../../scripts/app.js", "./litevsr_rules.js"]
    assert "import " not in "\n".join(l for l in (JS / "litevsr_rules.js").read_text().splitlines()
                                      if not l.startswith("//"))
    for script in SCRIPTS:
        assert "http://" not in (JS / script).read_text() and "https://" not in (JS / script).read_text()


def test_every_pack_node_has_a_served_help_page(comfy, object_info):
    nodes = pack_nodes(object_info)
    assert "LiteVSRCompare" in nodes
    for name, info in nodes.items():
        # where front end 1.32.9 looks (NodeHelpService): /extensions/<pack folder from python_module>/docs/<id>.md
        module = info["python_module"].split(".")
        assert module[0] == "custom_nodes", info["python_module"]
        status, _, body = get(comfy, f"/extensions/{module[1].split('@')[0]}/docs/{name}.md")
        text = body.decode()
        assert status == 200 and text.startswith(f"# {info['display_name']}\n"), (name, text[:80])
        for section in ("## Inputs", "## Tips", "## Common errors"):
            assert section in text, f"{name}.md has no '{section}'"
        for section in ("required", "optional"):
            for input_name in info["input"].get(section, {}):
                assert f"`{input_name}`" in text, f"{name}.md does not mention input {input_name}"
    stray = sorted(p.stem for p in (JS / "docs").glob("*.md") if p.stem not in nodes)
    assert not stray, f"help pages for nodes the server does not have: {stray}"


def test_missing_help_page_is_a_404(comfy):
    with pytest.raises(urllib.error.HTTPError) as error:
        get(comfy, f"{BASE}/docs/LiteVSRNoSuchNode.md")
    assert error.value.code == 404


# --- the warning rules under node, against the Python checks ------------------------------------------------------

HARNESS = """
import { readFileSync } from "node:fs";
const rules = await import(process.argv[2]);
const cases = JSON.parse(readFileSync(0, "utf8"));
console.log(JSON.stringify({
  validate: cases.validate.map(([type, values, upstream]) => rules.validate(type, values, upstream)),
  format: cases.format.map((message) => rules.formatProgress(message)),
  fields: rules.DEGRADATION_FIELDS,
  nodes: [...rules.RULE_NODES].sort(),
}));
"""


def run_rules(tmp_path, validate=(), format=()):
    module = tmp_path / "litevsr_rules.mjs"
    shutil.copyfile(JS / "litevsr_rules.js", module)
    harness = tmp_path / "harness.mjs"
    harness.write_text(HARNESS)
    result = subprocess.run([NODE, str(harness), module.as_uri()], input=json.dumps(
        {"validate": list(validate), "format": list(format)}), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def raises(check):
    try:
        check()
    except (ValueError, AttributeError, TypeError):
        return True
    return False


SIGNATURE = SimpleNamespace(family="wan2.1", grid_px=16, vae_stride=8, patch_size=(1, 2, 2))


def python_sampler(tile, overlap):
    """LiteVSR Sampler: explicit tile and overlap (0 = automatic, checked against the frame only at run time)."""
    return tile > 0 and overlap > 0 and raises(lambda: dit_tiling.latent_tiling(SIGNATURE, tile, overlap))


def python_stream(chunk, overlap):
    def check():
        if overlap % 4:
            raise ValueError("overlap")  # memory_plan.plan
        if chunk:
            memory_plan.check_chunk(chunk, 10_000, overlap)
    return raises(check)


def python_training(clip_frames, width, height, scale):
    """The dataset refuses the frame count on construction; the trainer refuses the crop."""
    return raises(lambda: check_clip_frames(clip_frames)) or raises(
        lambda: check_clip_geometry(SimpleNamespace(crop_width=width, crop_height=height), scale, SIGNATURE))


def python_overrides(text):
    return bool(text.strip()) and raises(lambda: with_overrides("standard", json.loads(text)))


SAMPLER = [(t, o) for t in (0, 64, 256, 512) for o in (0, 64, 256, 512)]
DECODE = [(t, o) for t in (64, 256, 512) for o in (0, 64, 256, 512)]
STREAM = [(c, o) for c in (0, 1, 5, 9, 17, 32, 33, 81) for o in (0, 4, 6, 8, 16, 28, 32)]
TRAINING_NODES = ("LiteVSRTrainAdapter", "LiteVSRDistillAdapter")  # both check the crop against the scale
TRAINING = [(c, w, h, s) for c in (1, 5, 16, 17) for w, h in ((256, 256), (250, 256), (256, 240), (96, 80))
            for s in (2, 3, 4)]
OVERRIDES = ["", "  ", "{}", '{"stage1": {"blur_sigma": [0.2, 2.0]}}', '{"stage1": {"blur_sigma": [1]}}',
             '{"stage1": ', "[]", '{"stage3": {}}', '{"final": {"blur_sigma": [0.2, 2.0]}}',
             '{"final": {"codecs": ["libx264"], "sinc_prob": 0.5}}', '{"stage2": {"noise_prob": "0.5"}}',
             '{"stage2": {"noise_prob": true}}', '{"stage1": {"kernel_probs": [1, 0, 0, 0, 0, 0, 0]}}',
             '{"stage1": {"resize_probs": [1, 0]}}', '{"stage1": []}', "[1]", "null", '"text"', "3"]


@needs_node
def test_rules_mirror_the_python_checks(tmp_path):
    cases, expected = [], []
    for t, o in SAMPLER:
        cases.append(["LiteVSRSampler", {"tile_size": t, "tile_overlap": o}, {}])
        expected.append(python_sampler(t, o))
    for t, o in DECODE:
        cases.append(["LiteVSRTiledDecode", {"tile_size": t, "overlap": o}, {}])
        expected.append(raises(lambda: core_decode.decode_latent_tiling(t, o, 8)))
    for c, o in STREAM:
        cases.append(["LiteVSRUpscaleVideoFile", {"chunk_frames": c, "overlap_frames": o}, {}])
        expected.append(python_stream(c, o))
    for text in OVERRIDES:
        cases.append(["LiteVSRDegradation", {"overrides": text, "preset": "standard", "scale": 4}, {}])
        expected.append(python_overrides(text))
    training_start = len(cases)
    for c, w, h, s in TRAINING:  # the dataset node's own rules, then each training node's (it sees both nodes)
        cases.append(["LiteVSRVideoDataset", {"clip_frames": c, "width": w, "height": h}, {}])
        cases += [[node, {}, {"dataset": {"clip_frames": c, "width": w, "height": h}, "degradation": {"scale": s}}]
                  for node in TRAINING_NODES]
    out = run_rules(tmp_path, cases)["validate"]
    warned = [bool(messages) for messages in out[:training_start]]
    mismatches = [(case, python, js) for case, python, js in zip(cases, expected, out) if bool(js) != python]
    assert not mismatches, "\n".join(f"{c}: python raises {p}, js warns {j}" for c, p, j in mismatches)
    assert any(warned) and not all(warned)
    group = 1 + len(TRAINING_NODES)
    for i, (c, w, h, s) in enumerate(TRAINING):
        dataset, *trains = out[training_start + i * group:training_start + (i + 1) * group]
        for node, train in zip(TRAINING_NODES, trains):
            assert bool(dataset or train) == python_training(c, w, h, s), (node, c, w, h, s, dataset, train)


@needs_node
def test_rule_messages_match_the_python_errors(tmp_path):
    out = run_rules(tmp_path, [
        ["LiteVSRTiledDecode", {"tile_size": 64, "overlap": 64}, {}],
        ["LiteVSRSampler", {"tile_size": 256, "tile_overlap": 256}, {}],
        ["LiteVSRUpscaleVideoFile", {"chunk_frames": 32, "overlap_frames": 8}, {}],
        ["LiteVSRUpscaleVideoFile", {"chunk_frames": 9, "overlap_frames": 8}, {}],
        ["LiteVSRVideoDataset", {"clip_frames": 16, "width": 256, "height": 256}, {}],
        ["LiteVSRTrainAdapter", {}, {"dataset": {"width": 256, "height": 250}, "degradation": {"scale": 4}}],
        ["LiteVSRDegradation", {"overrides": '{"stage1": {"blur_sigma": [1]}}'}, {}],
        ["LiteVSRSampler", {"tile_size": None, "tile_overlap": 512}, {}],  # driven by a link: unknown, no rule
        ["LiteVSRTrainAdapter", {}, {}],  # nothing connected
    ])["validate"]

    def python_error(check):
        with pytest.raises((ValueError, AttributeError)) as error:
            check()
        return str(error.value)

    assert out[0] == [python_error(lambda: core_decode.decode_latent_tiling(64, 64, 8))]
    assert out[1] == [python_error(lambda: dit_tiling.latent_tiling(SIGNATURE, 256, 256))]
    assert out[2] == ["chunk_frames must be 4n+1 (5, 9, ..., 33, 81) or 0 (auto), got 32; use 29 or 33"]
    assert python_error(lambda: memory_plan.check_chunk(32, 100, 8)).endswith("got 32; use 29 or 33")
    assert out[3][0].startswith(python_error(lambda: memory_plan.check_chunk(9, 100, 8)))
    assert out[4] == [python_error(lambda: VideoClipDataset(str(tmp_path), 16, (256, 256)))]
    assert out[5] == ["training crop 256x250 (Video Dataset) must be divisible by the degradation scale 4"]
    assert out[6][0].startswith("degradation overrides: stage1.blur_sigma takes a list")
    assert out[7] == [] and out[8] == []


@needs_node
def test_override_fields_match_the_degradation_config(tmp_path):
    config = DegradationConfig.preset("standard")

    def kind(name, default):
        if isinstance(default, tuple):
            return -1 if name in ("codecs", "kernel_sizes", "resize_modes") else len(default)
        return 0

    python = {part: {name: kind(name, getattr(getattr(config, part), name))
                     for name in getattr(config, part).__dataclass_fields__} for part in ("stage1", "stage2", "final")}
    assert run_rules(tmp_path)["fields"] == python


@needs_node
def test_rules_cover_pack_nodes_and_examples_are_clean(tmp_path, object_info):
    result = run_rules(tmp_path)
    assert set(result["nodes"]) <= set(pack_nodes(object_info))
    cases = []
    for ui_path, _ in workflows.example_pairs():
        prompt = workflows.ui_to_api(workflows.load(ui_path), object_info)
        for node in prompt.values():
            values = {k: v for k, v in node["inputs"].items() if not isinstance(v, list)}
            upstream = {k: {n: x for n, x in prompt[v[0]]["inputs"].items() if not isinstance(x, list)}
                        for k, v in node["inputs"].items() if isinstance(v, list)}
            cases.append([node["class_type"], values, upstream])
    out = run_rules(tmp_path, cases)["validate"]
    flagged = [(case[0], messages) for case, messages in zip(cases, out) if messages]
    assert not flagged, f"the shipped examples would be refused: {flagged}"


@needs_node
def test_progress_lines(tmp_path):
    plan = {"chunk_frames": 33, "overlap_frames": 8, "dit_tile": [832, 480], "dit_tiled": True, "decode_tile": 512,
            "decode_tiled": True, "chunks": 12, "scene_cuts": 0, "auto": []}
    lines = run_rules(tmp_path, format=[
        {"stage": "chunk", "done": 3, "total": 12, "eta_s": 84.2, "plan": plan},
        {"stage": "chunk", "done": 0, "total": 12, "eta_s": None, "plan": {**plan, "auto": ["decode_tile"]}},
        {"stage": "chunk", "done": 12, "total": 12, "eta_s": 0, "plan": {**plan, "chunks": 1, "dit_tiled": False}},
        {"stage": "step", "done": 10, "total": 1000, "eta_s": 3723, "loss": 0.123456, "validation_loss": 0.2,
         "plan": {"batch_size": 1, "grad_accumulation": 2, "clip_frames": 17, "crop": [256, 256]}},
        {"stage": "decode", "done": 2, "total": 6, "eta_s": 4, "plan": {"decode_tile": 512, "decode_overlap": 64}},
    ])["format"]
    assert lines == [
        "chunk 3/12 · ETA 1:24 · chunks 33 frames, overlap 8, DiT tile 832x480, decode tile 512",
        "chunk 0/12 · ETA … · chunks 33 frames, overlap 8, DiT tile 832x480, decode tile 512 (auto)",
        "chunk 12/12 · done · 1 chunk of 33 frames, DiT untiled, decode tile 512",
        "step 10/1000 · ETA 1:02:03 · loss 0.1235 · val 0.2000 · batch 1x2, clips 17 frames 256x256",
        "tile 2/6 · ETA 0:04 · decode tile 512, overlap 64",
    ]


# --- nodes/progress.py ---------------------------------------------------------------------------------------------


def test_eta_from_the_mean_time_per_unit():
    now = [100.0]
    eta = progress.Eta(0, clock=lambda: now[0])
    now[0] = 110.0
    assert eta(1, 4) == pytest.approx(30.0)
    now[0] = 120.0
    assert eta(2, 4) == pytest.approx(20.0)
    assert eta(4, 4) == 0.0
    lazy = progress.Eta(clock=lambda: now[0])  # starts at its first update (e.g. resumed training)
    assert lazy(50, 100) is None
    now[0] = 130.0
    assert lazy(51, 100) == pytest.approx(490.0)
    assert format_eta(84) == "1:24" and format_eta(3723) == "1:02:03"
    assert format_eta(None) == "?"


def test_progress_is_sent_only_under_a_server(monkeypatch):
    sent = []
    fake = types.ModuleType("server")
    fake.PromptServer = SimpleNamespace(instance=SimpleNamespace(
        client_id="client-1", send_sync=lambda event, data, sid: sent.append((event, data, sid))))
    monkeypatch.setitem(sys.modules, "server", fake)
    progress.send_progress(None, "chunk", 1, 2, 3.0, {"chunk_frames": 33})  # direct calls: no node id
    assert sent == []
    progress.send_progress(7, "chunk", 1, 2, 3.04, {"chunk_frames": 33}, loss=0.5)
    assert sent == [("litevsr.progress", {"node": "7", "stage": "chunk", "done": 1, "total": 2, "eta_s": 3.0,
                                          "plan": {"chunk_frames": 33}, "loss": 0.5}, "client-1")]
    fake.PromptServer = SimpleNamespace(instance=None)
    progress.send_progress(7, "chunk", 2, 2)
    assert len(sent) == 1


# --- in the real front end (headless Chromium, as tests/test_browser.py) -------------------------------------------


@pytest.fixture(scope="module")
def page(comfy):
    import browser

    paths, reason = browser.find_browser()
    if paths is None:
        pytest.skip(f"browser check skipped: {reason}")
    pytest.importorskip("selenium", reason="selenium is not installed (requirements-dev.txt)")
    driver = browser.make_driver(*paths)
    try:
        browser.open_frontend(driver, comfy.url)
        yield driver
    finally:
        driver.quit()


SET_WIDGET_JS = """
const [type, name, value] = arguments;
const node = app.graph._nodes.find(n => n.type === type);
const widget = node.widgets.find(w => w.name === name);
widget.value = value;
widget.callback?.(value, app.canvas, node);
"""
TEXT_JS = "return [...document.querySelectorAll(arguments[0])].map(e => e.textContent).join('\\n')"


def load_example(driver, name):
    import browser

    workflow = workflows.load(workflows.EXAMPLES / f"{name}.json")
    browser.load_workflow(driver, workflow)
    browser.wait_js(driver, f"return app.graph._nodes.length === {len(workflow['nodes'])}", 30, what=name)


def wait_text(driver, selector, expected, timeout=10):
    import browser

    return browser.wait_js(driver, f"const t = (() => {{ {TEXT_JS} }})(); return t.includes({json.dumps(expected)})"
                                   f" ? t : null".replace("arguments[0]", json.dumps(selector)), timeout,
                           what=f"{selector} to show {expected!r}")


def test_frontend_warns_and_refuses_to_queue(page, comfy):
    import browser

    load_example(page, "litevsr_upscale")
    assert page.execute_script(TEXT_JS, ".litevsr-warning").strip() == ""
    history = len(comfy.get("/history"))
    page.execute_script(SET_WIDGET_JS, "LiteVSRTiledDecode", "overlap", 512)
    wait_text(page, ".litevsr-warning", "tile size (512 px) must be larger than the overlap (512 px)")

    assert page.execute_async_script("const done = arguments[0]; app.queuePrompt(0, 1).then(done)") is False
    toast = wait_text(page, ".p-toast-message", "LiteVSR: not queued")
    assert "Tiled Decode" in toast or "tile size (512 px)" in toast, toast
    time.sleep(0.5)
    assert comfy.get("/queue")["queue_pending"] == [] and len(comfy.get("/history")) == history

    page.execute_script(SET_WIDGET_JS, "LiteVSRTiledDecode", "overlap", 64)
    browser.wait_js(page, f"return !(() => {{ {TEXT_JS} }})().trim()".replace("arguments[0]",
                                                                            json.dumps(".litevsr-warning")), 10,
                    what="the warning to clear")
    assert not browser.severe_errors(browser.console_entries(page))


def test_frontend_checks_training_settings_across_nodes(page):
    load_example(page, "litevsr_train")
    # (the widgets' steps already keep width/height on 16 px and clip_frames on 4n+1 in the editor)
    page.execute_script(SET_WIDGET_JS, "LiteVSRDegradation", "scale", 3)
    wait_text(page, ".litevsr-warning", "training crop 256x256 (Video Dataset) must be divisible by the degradation "
                                        "scale 3")
    page.execute_script(SET_WIDGET_JS, "LiteVSRDegradation", "overrides", '{"stage1": ')
    wait_text(page, ".litevsr-warning", "overrides are not valid JSON")


def test_frontend_shows_progress_lines(page):
    load_example(page, "litevsr_long_video")
    node_id = page.execute_script("return app.graph._nodes.find(n => n.type === 'LiteVSRUpscaleVideoFile').id")
    page.execute_script(
        "const api = window.comfyAPI.api.api; api.dispatchCustomEvent('litevsr.progress', arguments[0])",
        {"node": str(node_id), "stage": "chunk", "done": 3, "total": 12, "eta_s": 84,
         "plan": {"chunk_frames": 33, "overlap_frames": 8, "dit_tile": [832, 480], "dit_tiled": True,
                  "decode_tile": 512, "decode_tiled": True, "chunks": 12, "auto": []}})
    wait_text(page, ".litevsr-progress",
              "chunk 3/12 · ETA 1:24 · chunks 33 frames, overlap 8, DiT tile 832x480, decode tile 512")
