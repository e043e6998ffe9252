"""Drive ComfyUI's real front end in a headless Chromium (Selenium), for tests/test_browser.py.

Uses the system's Chromium and its matching chromedriver (Debian: `apt-get install chromium chromium-driver`),
never a downloaded browser: the driver is given explicit paths, so Selenium Manager is not consulted.
Override the paths with LITEVSR_CHROMIUM / LITEVSR_CHROMEDRIVER.
"""
import json
import os
import re
import shutil
import time
from pathlib import Path

WINDOW = (1600, 1000)

# SEVERE browser-console entries that ComfyUI 0.3.75 / comfyui_frontend_package 1.32.9 itself logs on a fresh
# server, with or without this pack (checked against a server with no custom nodes). Anything else fails the test.
BENIGN_CONSOLE = [
    (r"/user\.css - Failed to load resource: .* 404",
     "the front end probes an optional user stylesheet (/user.css, /api/userdata/user.css); none is set up"),
    (r"/favicon\.ico - Failed to load resource: .* 404",
     "Chromium asks for /favicon.ico by itself; the front end package has no file there"),
    (r"/api/userdata\?dir=(workflows|subgraphs)(%2F)?&.* - Failed to load resource: .* 404",
     "a fresh user directory has no saved workflows/ or subgraphs/ folder yet; the front end lists them anyway"),
    (r"/api/userdata/comfy\.templates\.json - Failed to load resource: .* 404",
     "a fresh user directory has no saved node templates"),
    (r"Connecting to 'https://api\.comfy\.org/[^']*' violates the following Content Security Policy directive: "
     r"\"connect-src 'self'( data:)?\"",
     "the harness starts ComfyUI with --disable-api-nodes, which makes the server send a connect-src 'self' CSP: "
     "the front end's look-ups of node packs on api.comfy.org (made for every loaded node type) are blocked, as "
     "intended for an offline server"),
    (r"TypeError: Cannot read properties of undefined \(reading 'id'\)\s+at onChange \(\S*/assets/index-[\w-]+\.js"
     r":[\d:]+\)\s+at Proxy\.set",
     "front end 1.32.9 bug (its useRenderModeSetting, Comfy-Org/ComfyUI_frontend PR #6755, sets "
     "LiteGraph.Canvas.MinFontSizeForLOD before that setting is registered): logged once per page load, harmless"),
    (r"\"ComfyApp graph accessed before initialization\"",
     "front end 1.49 (ComfyUI 0.33) logs this during its own start-up with no custom node loaded (checked with the "
     "pack disabled)"),
    (r"(Connecting to 'https://huggingface\.co/[^']*' violates the following Content Security Policy directive|"
     r"Fetch API cannot load https://huggingface\.co/\S+ Refused to connect because it violates the document's "
     r"Content Security Policy)",
     "front end 1.49 checks the model download links of its default workflow (missingModelMetadata); the offline "
     "server's connect-src CSP (--disable-api-nodes) blocks them"),
]


def find_browser():
    """(chromium, chromedriver) paths, or (None, reason) when they are not installed."""
    chromium = os.environ.get("LITEVSR_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("LITEVSR_CHROMEDRIVER") or shutil.which("chromedriver")
    if not chromium or not Path(chromium).exists():
        return None, "chromium is not installed (apt-get install chromium chromium-driver)"
    if not driver or not Path(driver).exists():
        return None, "chromedriver is not installed (apt-get install chromium-driver)"
    return (chromium, driver), None


def make_driver(chromium, chromedriver, window=WINDOW):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={window[0]},{window[1]}", "--hide-scrollbars", "--force-device-scale-factor=1",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=opts)
    driver.set_script_timeout(120)
    # the viewport itself, not the window, is WINDOW: screenshots come out exactly that size
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": window[0], "height": window[1], "deviceScaleFactor": 1, "mobile": False})
    return driver


def wait_js(driver, script, timeout=60, interval=0.25, what=None):
    """Poll `script` (a JS expression body returning a value) until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = driver.execute_script(script)
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what or script}")
        time.sleep(interval)


# user settings stored on the (test) server before the page opens: no first-run templates dialog, and no minimap
# or canvas statistics over the graph in screenshots
FRONTEND_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False,
                     "Comfy.Graph.CanvasInfo": False}


def open_frontend(driver, url, timeout=90):
    """Load ComfyUI's front end with its first-run extras out of the way: FRONTEND_SETTINGS on the server, and no
    "Nodes 2.0" banner (dismissed in localStorage before the page runs)."""
    import urllib.request

    req = urllib.request.Request(f"{url}/api/settings", data=json.dumps(FRONTEND_SETTINGS).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=30).close()
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {
        "source": "try { localStorage.setItem('vueNodesBannerDismissed', 'true') } catch (e) {}"})
    driver.get(url)
    wait_js(driver, "return !!(window.app && window.app.graph && window.LiteGraph && window.app.canvas"
                    " && document.querySelector('canvas'))", timeout, what="the ComfyUI front end")
    wait_js(driver, "return Object.keys(LiteGraph.registered_node_types).length > 0", timeout,
            what="registered node types")


def console_entries(driver):
    """Browser console entries since the last call (chromedriver drains them)."""
    return driver.get_log("browser")


def benign_reason(message):
    for pattern, reason in BENIGN_CONSOLE:
        if re.search(pattern, message, re.S):
            return reason
    return None


def severe_errors(entries):
    """The SEVERE console entries not on the BENIGN_CONSOLE list."""
    return [e for e in entries if e.get("level") == "SEVERE" and benign_reason(e.get("message", "")) is None]


def load_workflow(driver, workflow):
    """Load a UI-format workflow (a dict) as the front end does for a dropped file; returns once it is loaded."""
    error = driver.execute_async_script(
        "const [wf, done] = arguments;"
        "app.loadGraphData(wf, true, true, null).then(() => done(null), e => done(String(e && e.stack || e)));",
        workflow)
    if error:
        raise RuntimeError(f"app.loadGraphData failed: {error}")


def graph_node_types(driver):
    return driver.execute_script("return app.graph._nodes.map(n => n.type)")


def missing_node_types(driver):
    return driver.execute_script(
        "return app.graph._nodes.map(n => n.type).filter(t => !(t in LiteGraph.registered_node_types))")


VISIBLE_DIALOGS_JS = (
    "const shown = [...document.querySelectorAll('.p-dialog')].filter(d => d.getClientRects().length"
    " && getComputedStyle(d).visibility !== 'hidden');"
    "return shown.length ? shown.map(d => d.innerText.trim().slice(0, 400)) : null")


def visible_dialogs(driver):
    """Text of the open PrimeVue dialogs (e.g. the front end's "This workflow has missing nodes")."""
    return driver.execute_script(VISIBLE_DIALOGS_JS) or []


def close_dialogs(driver, timeout=10):
    driver.execute_script(
        "document.querySelectorAll('.p-dialog').forEach(d => d.querySelector("
        "'.p-dialog-close-button, button[aria-label=\"Close\"]')?.click())")
    wait_js(driver, "return !(() => {" + VISIBLE_DIALOGS_JS + "})()", timeout, what="the dialogs to close")


def litevsr_warnings(driver):
    return driver.execute_script("return [...document.querySelectorAll('.litevsr-warning')].map(e => e.innerText)")


# the part of the viewport the graph is fitted into: clear of the side bar (left), the workflow tabs, the floating
# workflow menu and Run bar (top) and the zoom controls (bottom)
GRAPH_AREA = {"left": 70, "top": 100, "right": 20, "bottom": 70}


def _fit(driver, node_filter_js, zoom, with_groups):
    driver.execute_script(
        "const [area, zoom, withGroups] = arguments;"
        "const rects = app.graph._nodes.filter(" + node_filter_js + ").map(n => n.boundingRect);"
        "if (withGroups) rects.push(...app.graph._groups.map(g => g._bounding || g.boundingRect));"
        "let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;"
        "for (const [x, y, w, h] of rects) {"
        "  x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x + w); y1 = Math.max(y1, y + h) }"
        "const c = app.canvas.canvas.getBoundingClientRect();"
        "const left = area.left - c.left, top = area.top - c.top;"
        "const w = c.width - left - area.right, h = c.height - top - area.bottom;"
        "const ds = app.canvas.ds, scale = Math.min(zoom * w / (x1 - x0), zoom * h / (y1 - y0), 2);"
        "ds.scale = scale;"
        "ds.offset[0] = (left + w / 2) / scale - (x0 + x1) / 2;"
        "ds.offset[1] = (top + h / 2) / scale - (y0 + y1) / 2;"
        "app.canvas.setDirty(true, true); app.canvas.draw(true, true);", GRAPH_AREA, zoom, with_groups)
    time.sleep(0.6)  # DOM widgets (video preview, compare view) follow the canvas on the next frames


def fit_view(driver, zoom=0.98):
    """The whole graph (nodes and groups) in view, clear of the front end's panels."""
    _fit(driver, "n => true", zoom, True)


def center_on_type(driver, node_type, zoom=0.8):
    """Zoom onto the nodes of one type."""
    _fit(driver, f"n => n.type === {json.dumps(node_type)}", zoom, False)


def watch_execution(driver):
    """Record in window.__litevsrRun what happens to the next prompt this page queues: queued (with its id), done,
    or an error (queueing refused or failed, execution error, interrupted, or nothing queued within 30 s)."""
    driver.execute_script(r"""
        const api = window.comfyAPI?.api?.api || app.api;
        const run = window.__litevsrRun = {queued: false, promptId: null, done: false, error: null,
                                           clickedAt: null};
        if (!api.__litevsrWatched) {
          api.__litevsrWatched = true;
          const queuePrompt = api.queuePrompt.bind(api);
          api.queuePrompt = async (...args) => {
            const r = window.__litevsrRun;
            try {
              const res = await queuePrompt(...args);
              r.queued = true; r.promptId = res?.prompt_id ?? null;
              return res;
            } catch (e) {
              r.error = `queueing was refused: ${e?.message || e} ${JSON.stringify(e?.response ?? '')}`;
              throw e;
            }
          };
          const mine = d => !window.__litevsrRun.promptId || d?.prompt_id === window.__litevsrRun.promptId;
          api.addEventListener('execution_success', e => { if (mine(e.detail)) window.__litevsrRun.done = true });
          api.addEventListener('execution_error', e => { const d = e.detail || {};
            if (mine(d)) window.__litevsrRun.error = `node ${d.node_id} (${d.node_type}) failed: ` +
              `${d.exception_type}: ${d.exception_message}` });
          api.addEventListener('execution_interrupted', e => {
            if (mine(e.detail)) window.__litevsrRun.error = 'the run was interrupted' });
          setInterval(() => { const r = window.__litevsrRun;
            if (r.clickedAt && !r.queued && !r.error && Date.now() - r.clickedAt > 30000)
              r.error = 'nothing was queued within 30 s of pressing Run' }, 1000);
        }
    """)


def click_run(driver):
    """Press the front end's Run button (falls back to app.queuePrompt when this front end has none)."""
    from selenium.webdriver.common.by import By

    driver.execute_script("window.__litevsrRun.clickedAt = Date.now()")
    for button in driver.find_elements(By.CSS_SELECTOR, "button"):
        if button.is_displayed() and button.text.strip() == "Run":
            button.click()
            return "the Run button"
    driver.execute_script("app.queuePrompt(0, 1)")
    return "app.queuePrompt (no Run button found)"


COMPARE_STATE_JS = r"""
    const roots = [...document.querySelectorAll('.litevsr-compare')];
    const root = roots.find(r => r.getClientRects().length) || roots[0];
    if (!root) return null;
    const before = root.querySelector('img.litevsr-before'), after = root.querySelector('img.litevsr-after');
    if (!before || !after || !before.complete || !after.complete || !before.naturalWidth || !after.naturalWidth)
      return null;
    const r = root.getBoundingClientRect(), style = getComputedStyle(root);
    const visible = r.width > 0 && r.height > 0 && style.display !== 'none' && style.visibility !== 'hidden'
      && r.right > 0 && r.bottom > 0 && r.left < innerWidth && r.top < innerHeight;
    return {visible, before: before.naturalWidth, after: after.naturalWidth,
            after_size: `${after.naturalWidth}x${after.naturalHeight}`,
            slider: !!root.querySelector('input[type=range].litevsr-slider'),
            rect: [r.left, r.top, r.width, r.height]};
"""


def move_compare_slider(driver):
    """Drive the compare slider with the keyboard (Home, then End), then put it back to the middle as a drag would
    (value 50 + an input event); return the after image's clip-path after each move."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    root = next((r for r in driver.find_elements(By.CSS_SELECTOR, ".litevsr-compare") if r.is_displayed()),
                None)
    assert root is not None, "no visible .litevsr-compare"
    slider = root.find_element(By.CSS_SELECTOR, "input[type=range].litevsr-slider")
    after = root.find_element(By.CSS_SELECTOR, "img.litevsr-after")
    clips = []
    for key in (Keys.HOME, Keys.END):
        slider.send_keys(key)
        time.sleep(0.2)
        clips.append(driver.execute_script("return getComputedStyle(arguments[0]).clipPath", after))
    driver.execute_script("const s = arguments[0]; s.value = String((Number(s.min || 0) + Number(s.max || 100)) / 2);"
                          "s.dispatchEvent(new Event('input', {bubbles: true}));"
                          "s.dispatchEvent(new Event('change', {bubbles: true}))", slider)
    time.sleep(0.2)
    clips.append(driver.execute_script("return getComputedStyle(arguments[0]).clipPath", after))
    return clips


def compare_node_png(driver, margin=24):
    """A PNG of the LiteVSRCompare node (as drawn on screen, with its compare view), cropped from a screenshot."""
    import io

    from PIL import Image

    x, y, w, h = driver.execute_script(
        "const n = app.graph._nodes.find(n => n.type === 'LiteVSRCompare'); const [x, y, w, h] = n.boundingRect;"
        "const ds = app.canvas.ds, c = app.canvas.canvas.getBoundingClientRect();"
        "return [c.left + (x + ds.offset[0]) * ds.scale, c.top + (y + ds.offset[1]) * ds.scale,"
        "        w * ds.scale, h * ds.scale]")
    image = Image.open(io.BytesIO(driver.get_screenshot_as_png()))
    box = (max(0, int(x - margin)), max(0, int(y - margin)), min(image.width, int(x + w + margin)),
           min(image.height, int(y + h + margin)))
    out = io.BytesIO()
    image.crop(box).save(out, "PNG", optimize=True)
    return out.getvalue()


def shrink_png(png, max_bytes):
    """The PNG re-encoded (optimised, then 256-colour, then smaller) until it is at most max_bytes."""
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    candidates = [lambda im: im, lambda im: im.quantize(256, method=Image.Quantize.MEDIANCUT)]
    scale = 1.0
    while True:
        for prepare in candidates:
            out = io.BytesIO()
            prepare(image if scale == 1.0 else image.resize(
                (int(image.width * scale), int(image.height * scale)), Image.LANCZOS)).save(out, "PNG", optimize=True)
            if out.tell() <= max_bytes:
                return out.getvalue()
        scale *= 0.8
