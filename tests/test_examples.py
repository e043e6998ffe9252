"""The shipped example workflows: UI files and their API twins agree, and every node they use is registered."""
import json
import urllib.request

import pytest

import workflows

PAIRS = workflows.example_pairs()


def test_examples_exist():
    assert PAIRS, f"no UI example with an API twin under {workflows.EXAMPLES}"


@pytest.mark.parametrize("ui_path,api_path", PAIRS, ids=[p[0].stem for p in PAIRS])
def test_ui_matches_api_twin(ui_path, api_path, object_info):
    ui, api = workflows.load(ui_path), workflows.load(api_path)
    assert ui.get("version") == 0.4
    missing = sorted({n["type"] for n in ui["nodes"]} - workflows.FRONTEND_ONLY - set(object_info))
    assert not missing, f"node types not registered on the server: {missing}"
    converted = workflows.ui_to_api(ui, object_info)
    assert workflows.canonical(converted, object_info) == workflows.canonical(workflows.strip_meta(api), object_info)


@pytest.mark.parametrize("ui_path,api_path", PAIRS, ids=[p[0].stem for p in PAIRS])
def test_api_twin_validates_on_server(ui_path, api_path, object_info):
    """Every input the twin sets is one the node declares, and every required input is set."""
    api = workflows.load(api_path)
    for node_id, node in api.items():
        info = object_info[node["class_type"]]
        declared = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        assert set(node["inputs"]) <= set(declared), (node_id, set(node["inputs"]) - set(declared))
        assert set(info["input"].get("required", {})) <= set(node["inputs"]), node_id
        for name, value in node["inputs"].items():
            kind = declared[name][0]
            options = kind if isinstance(kind, list) else declared[name][1].get("options") if kind == "COMBO" else None
            if options is not None and not isinstance(value, list):
                assert value in options, f"node {node_id} {name}={value!r} not in {options}"


def test_templates_list_only_ui_files(comfy):
    """ComfyUI's template browser lists the UI examples of the pack, never the API twins."""
    listed = comfy.get("/workflow_templates").get(comfy_pack_name())
    assert sorted(listed or []) == sorted(ui.stem for ui, _ in PAIRS)
    for ui, _ in PAIRS:  # and serves them
        with urllib.request.urlopen(f"{comfy.url}/api/workflow_templates/{comfy_pack_name()}/{ui.name}") as r:
            assert json.loads(r.read())["nodes"]


def comfy_pack_name():
    from tools import comfy_server

    return comfy_server.PACK_NAME

