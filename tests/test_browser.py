"""The pack in ComfyUI's real front end, in a headless Chromium (Selenium + the system chromedriver).

Every example workflow loads through the page with all its node types registered, no "missing nodes" dialog and
no console errors; the upscale example is queued from the UI's Run button and its Compare node shows the
before/after view. Skipped, with the reason, when chromium/chromedriver or selenium are missing
(`apt-get install chromium chromium-driver`; .ci/run does this).

LITEVSR_UPDATE_SCREENSHOTS=1 also rewrites the README's screenshots in docs/images/.
"""
import json
import os
import time
import urllib.parse
from pathlib import Path

import pytest

import browser
from tools import comfy_server

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "example_workflows").glob("*.json"))
UPSCALE_EXAMPLE = REPO / "example_workflows" / "litevsr_upscale.json"
ARTIFACTS = REPO / "output" / "test-artifacts"  # output/ is git-ignored
DOCS_IMAGES = REPO / "docs" / "images"
UPDATE_SCREENSHOTS = os.environ.get("LITEVSR_UPDATE_SCREENSHOTS", "") not in ("", "0")
DOC_SHOTS = {"litevsr_upscale": "upscale_graph.png", "litevsr_train": "train_graph.png"}
MAX_DOC_PNG = 500 * 1024
RUN_TIMEOUT = 420  # the upscale example on the tiny stand-ins: ~10-60 s on a CPU

_paths, _reason = browser.find_browser()
try:
    import selenium  # noqa: F401
except ImportError:
    _paths, _reason = None, "selenium is not installed in the test environment (requirements-dev.txt)"
pytestmark = pytest.mark.skipif(_paths is None, reason=f"browser test skipped: {_reason}")


@pytest.fixture(scope="module")
def page(comfy):
    driver = browser.make_driver(*_paths)
    try:
        browser.open_frontend(driver, comfy.url)
        page = Page(driver, comfy)
        page.check_console("opening the front end")
        yield page
    finally:
        driver.quit()


class Page:
    def __init__(self, driver, comfy):
        self.driver, self.comfy = driver, comfy

    def check_console(self, when):
        """Fail on any SEVERE console entry (since the last check) that is not on browser.BENIGN_CONSOLE."""
        errors = browser.severe_errors(browser.console_entries(self.driver))
        assert not errors, f"console errors while {when}:\n" + "\n".join(e["message"] for e in errors)

    def load_template(self, name):
        """Load an example as the template browser does: the server's copy, through the page."""
        route = f"/workflow_templates/{urllib.parse.quote(comfy_server.PACK_NAME)}/{name}.json"
        error = self.driver.execute_async_script(
            "const [route, name, done] = arguments;"
            "const api = window.comfyAPI?.api?.api || app.api;"
            "fetch(api.apiURL(route)).then(r => { if (!r.ok) throw new Error(`${route}: HTTP ${r.status}`);"
            "  return r.json() })"
            ".then(wf => app.loadGraphData(wf, true, true, name))"
            ".then(() => done(null), e => done(String(e && e.stack || e)));", route, name)
        assert error is None, f"loading {name} failed in the page: {error}"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_loads_in_frontend(page, path):
    workflow = json.loads(path.read_text())
    page.load_template(path.stem)
    driver = page.driver
    browser.wait_js(driver, f"return app.graph._nodes.length === {len(workflow['nodes'])}", 30,
                    what=f"{path.stem}'s {len(workflow['nodes'])} nodes in the graph")
    time.sleep(1.0)  # let the load's asynchronous follow-ups (dialogs, registry look-ups) happen
    assert sorted(browser.graph_node_types(driver)) == sorted(n["type"] for n in workflow["nodes"])
    missing = browser.missing_node_types(driver)
    assert not missing, f"{path.name}: node types the front end does not know: {missing}"
    dialogs = browser.visible_dialogs(driver)
    assert not dialogs, f"{path.name}: dialogs open after loading: {dialogs}"
    page.check_console(f"loading {path.name}")
    if UPDATE_SCREENSHOTS and path.stem in DOC_SHOTS:
        browser.fit_view(driver)
        save_doc_png(driver.get_screenshot_as_png(), DOC_SHOTS[path.stem])


def test_missing_node_check_is_not_vacuous(page):
    """A node type the server does not have is caught both ways the example test looks for it (the dialog only
    where the front end has one: 1.49, ComfyUI 0.33, dropped the "missing nodes" dialog and its setting)."""
    workflow = json.loads(UPSCALE_EXAMPLE.read_text())
    workflow["nodes"][0]["type"] = "LiteVSRNoSuchNode"
    browser.load_workflow(page.driver, workflow)
    try:
        assert browser.missing_node_types(page.driver) == ["LiteVSRNoSuchNode"]
        if page.driver.execute_script(
                "return app.extensionManager.setting.get('Comfy.Workflow.ShowMissingNodesWarning')") is None:
            return
        dialogs = browser.wait_js(page.driver, browser.VISIBLE_DIALOGS_JS, 10, what="the missing nodes dialog")
        assert any("LiteVSRNoSuchNode" in d for d in dialogs), dialogs
    finally:
        browser.close_dialogs(page.driver)
    page.check_console("loading a graph with an unknown node type")


@pytest.mark.slow
def test_upscale_example_runs_from_ui_and_shows_compare(page, capsys):
    driver = page.driver
    page.load_template(UPSCALE_EXAMPLE.stem)
    types = browser.graph_node_types(driver)
    assert "LiteVSRCompare" in types, f"{UPSCALE_EXAMPLE.name} has no LiteVSRCompare node: {types}"
    page.check_console("loading the upscale example")

    browser.watch_execution(driver)
    started = time.monotonic()
    how = browser.click_run(driver)
    outcome = browser.wait_js(
        driver, "const w = window.__litevsrRun; return w.error || w.done ? w : null", RUN_TIMEOUT,
        interval=0.5, what=f"the upscale example to finish (queued by {how})")
    elapsed = time.monotonic() - started
    assert not outcome.get("error"), (f"the run failed: {outcome['error']}\n"
                                      f"LiteVSR warnings on the graph: {browser.litevsr_warnings(driver)}\n"
                                      f"server log tail:\n{page.comfy.log_tail(20)}")

    # the Compare node's DOM widget: both images loaded, a slider, and the slider moves the split
    browser.center_on_type(driver, "LiteVSRCompare")
    state = browser.wait_js(driver, browser.COMPARE_STATE_JS, 60, what="the compare view with both images loaded")
    assert state["visible"], state
    assert state["before"] > 0 and state["after"] > 0, state
    assert state["slider"], state
    clips = browser.move_compare_slider(driver)
    assert len(set(clips)) == len(clips), f"moving the slider did not change the after image's clip: {clips}"
    page.check_console("running the upscale example")

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "browser_compare.png"
    driver.save_screenshot(str(shot))
    with capsys.disabled():
        print(f"\n[browser] upscale example ran from the UI in {elapsed:.1f} s ({how}); compare view "
              f"{state['after_size']}, after-image clip {' -> '.join(clips)}; screenshot: {shot}")
    if UPDATE_SCREENSHOTS:
        save_doc_png(browser.compare_node_png(driver), "compare_view.png")


def save_doc_png(png, name):
    DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
    png = browser.shrink_png(png, MAX_DOC_PNG)
    (DOCS_IMAGES / name).write_bytes(png)
    print(f"[browser] wrote {DOCS_IMAGES / name} ({len(png) // 1024} KB)")
