"""Test helpers for example workflows: find UI/API pairs and convert UI (litegraph) JSON to API format.

ComfyUI converts UI graphs to API prompts only in the front end (graphToPrompt); this is the small subset the
examples need: widget values mapped to widget input names in the live server's /object_info order, links to
[node_id, slot], muted/bypassed nodes and notes dropped, the seed's "control after generate" value skipped. A
workflow saved on an older ComfyUI lacks the values of optional widgets added since (CreateVideo's `bit_depth` in
0.3x): as the front end does, those take their declared defaults; and widgets that became dynamic combos (Save
Video's format) take their nested widgets' values as `parent.child`.
"""
import json
from collections import deque
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "example_workflows"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"  # newer ComfyUI: a combo whose chosen option brings widgets of its own
FRONTEND_ONLY = {"Note", "MarkdownNote"}  # text on the canvas: the front end's own nodes, never sent to the server


def example_pairs():
    """[(ui_path, api_path)] for every UI example with an API twin in example_workflows/api/<name>_api.json."""
    return [(ui, EXAMPLES / "api" / f"{ui.stem}_api.json") for ui in sorted(EXAMPLES.glob("*.json"))
            if (EXAMPLES / "api" / f"{ui.stem}_api.json").is_file()]


def load(path):
    return json.loads(Path(path).read_text())


def widget_inputs(info, prefix=""):
    """[(name, options)] of a node's widget inputs, in the order the front end lays out its widgets. A dynamic combo
    (newer ComfyUI) is followed by the widgets of its chosen option (`option_widgets`); hidden inputs have none."""
    inputs = info["input"]
    order = info.get("input_order") or {k: list(v) for k, v in inputs.items()}
    names = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = inputs[section][name]
            kind, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
            if (isinstance(kind, list) or kind in WIDGET_TYPES or kind == DYNAMIC_COMBO) \
                    and not opts.get("forceInput") and not opts.get("hidden"):
                names.append((prefix + name, dict(opts, optional=section == "optional", dynamic=kind == DYNAMIC_COMBO)))
    return names


def option_widgets(name, opts, value):
    """The widgets that option `value` of dynamic combo `name` brings, named `name.child` as the front end names
    them in API prompts."""
    chosen = [option for option in opts.get("options", []) if option.get("key") == value]
    return widget_inputs({"input": chosen[0]["inputs"]}, prefix=name + ".") if chosen else []


def canonical(prompt, object_info):
    """The prompt as the server reads it, whichever ComfyUI saved it: optional widget inputs at their declared
    default dropped (a twin saved before such a widget existed means the same graph), and a dynamic combo's nested
    value `parent.child` spelled `child` where the node still declares `child` as its hidden legacy input (what
    an API prompt saved on an older ComfyUI sends, e.g. Save Video's `codec`)."""
    out = {}
    for node_id, node in prompt.items():
        info = object_info[node["class_type"]]
        defaults = {name: opts["default"] for name, opts in widget_inputs(info)
                    if opts["optional"] and "default" in opts}
        legacy = {name for name, spec in info["input"].get("optional", {}).items()
                  if len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("hidden")}
        inputs = {}
        for name, value in node["inputs"].items():
            leaf = name.rsplit(".", 1)[-1]
            inputs[leaf if leaf in legacy else name] = value
        inputs = {name: value for name, value in inputs.items() if not (name in defaults and value == defaults[name])}
        out[node_id] = {"class_type": node["class_type"], "inputs": inputs}
    return out


def control_widget(name, opts):
    """Whether the front end adds a "control after generate" widget after this INT widget: when the input asks for
    one, and, when it does not say, for inputs named seed or noise_seed (the front end's legacy convention)."""
    flag = opts.get("control_after_generate")
    return flag if flag is not None else name in ("seed", "noise_seed")


def ui_to_api(ui, object_info):
    links = {link[0]: link for link in ui["links"]}
    prompt = {}
    for node in ui["nodes"]:
        if node.get("mode", 0) in (2, 4) or node["type"] in FRONTEND_ONLY:  # muted, bypassed, a note
            continue
        if node["type"] not in object_info:
            raise KeyError(f"node {node['id']}: type {node['type']} is not registered on the server")
        widgets = widget_inputs(object_info[node["type"]])
        values = node.get("widgets_values") or []
        inputs = {}
        if isinstance(values, dict):
            inputs.update({name: values[name] for name, _ in widgets if name in values})
        else:
            i, pending = 0, deque(widgets)
            while pending:
                name, opts = pending.popleft()
                if i >= len(values):
                    if opts["optional"] and "default" in opts:  # a widget added after the file was saved
                        inputs[name] = opts["default"]
                        continue
                    raise ValueError(f"node {node['id']} ({node['type']}): no widget value for {name}")
                inputs[name] = values[i]
                i += 1
                if opts["dynamic"]:
                    pending.extendleft(reversed(option_widgets(name, opts, inputs[name])))
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
