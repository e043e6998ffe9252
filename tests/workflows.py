"""Test helpers for example workflows: find UI/API pairs and convert UI (litegraph) JSON to API format.

ComfyUI converts UI graphs to API prompts only in the front end (graphToPrompt); this is the small subset the
examples need: widget values mapped to widget input names in the live server's /object_info order, links to
[node_id, slot], muted/bypassed nodes dropped, the seed's "control after generate" value skipped.
"""
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "example_workflows"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}


def example_pairs():
    """[(ui_path, api_path)] for every UI example with an API twin in example_workflows/api/<name>_api.json."""
    return [(ui, EXAMPLES / "api" / f"{ui.stem}_api.json") for ui in sorted(EXAMPLES.glob("*.json"))
            if (EXAMPLES / "api" / f"{ui.stem}_api.json").is_file()]


def load(path):
    return json.loads(Path(path).read_text())


def widget_inputs(info):
    """[(name, options)] of a node's widget inputs, in the order the front end lays out its widgets."""
    order = info.get("input_order") or {k: list(v) for k, v in info["input"].items()}
    names = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = info["input"][section][name]
            kind, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
            if (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput"):
                names.append((name, opts))
    return names


def control_widget(name, opts):
    """Whether the front end adds a "control after generate" widget after this INT widget: when the input asks for
    one, and, when it does not say, for inputs named seed or noise_seed (the front end's legacy convention)."""
    flag = opts.get("control_after_generate")
    return flag if flag is not None else name in ("seed", "noise_seed")


def ui_to_api(ui, object_info):
    links = {link[0]: link for link in ui["links"]}
    prompt = {}
    for node in ui["nodes"]:
        if node.get("mode", 0) in (2, 4):  # muted, bypassed
            continue
        if node["type"] not in object_info:
            raise KeyError(f"node {node['id']}: type {node['type']} is not registered on the server")
        widgets = widget_inputs(object_info[node["type"]])
        values = node.get("widgets_values") or []
        inputs = {}
        if isinstance(values, dict):
            inputs.update({name: values[name] for name, _ in widgets if name in values})
        else:
            i = 0
            for name, opts in widgets:
                if i >= len(values):
                    raise ValueError(f"node {node['id']} ({node['type']}): no widget value for {name}")
                inputs[name] = values[i]
                i += 1
                if control_widget(name, opts) and i < len(values) and values[i] in CONTROL_VALUES:
                    i += 1
            rest = values[i:]
            uploads = any(k.endswith("_upload") for _, o in widgets for k in o)
            if rest and not (uploads and rest == ["image"]):  # the upload button's placeholder value
                raise ValueError(f"node {node['id']} ({node['type']}): unused widget values {rest}")
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                link = links[inp["link"]]
                assert link[3] == node["id"], f"link {link} does not end at node {node['id']}"
                inputs[inp["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def strip_meta(prompt):
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}
