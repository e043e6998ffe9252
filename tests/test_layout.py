"""How tools/, bench/ and tests/ load each other: as packages from the repository root, through public names.

tools/ and bench/ are packages (`from tools import demo`, `python -m bench.run`, `torchrun -m tools.upscale`), found
on the repository root: the Makefile and the tests' subprocesses run from there, and pytest puts it on sys.path
(pyproject.toml's `pythonpath`); tests/ holds its helpers beside the tests (pytest's rootdir import). So no module
puts a folder on sys.path, with one exception: tools/comfy_env.py puts ComfyUI's source tree there. ComfyUI is no
package (its modules are top-level: `comfy`, `nodes`, `folder_paths`) and imports itself that way; PYTHONPATH would
not do, because a script run from the repository root has the root first on sys.path, where the pack's `nodes/`
would hide ComfyUI's `nodes.py`. comfy_env puts ComfyUI in front of it, in the one place every tool and test uses.

Code that runs in a subprocess (`python -c` scripts in strings) is checked as text, the rest as syntax.
"""
import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("tools", "bench", "tests")
SYS_PATH_ALLOWED = {"tools/comfy_env.py"}  # ComfyUI's source tree (see above)
OWN_PACKAGES = ("tools", "bench", "comfyui_litevsr")
TEST_HELPERS = {path.stem for path in (REPO / "tests").glob("*.py")}  # conftest, workflows, browser, test_x, ...


def sources(*folders):
    return {str(path.relative_to(REPO)): path.read_text() for folder in folders
            for path in sorted((REPO / folder).rglob("*.py"))}


def own(module):
    return module.split(".")[0] in OWN_PACKAGES or module in TEST_HELPERS


def private(name):
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_module_puts_a_folder_on_sys_path():
    edits = re.compile(r"\bsys\.path\.(insert|append|extend)\(|\bsite\.addsitedir\(|\bsys\.path\s*(\+=|=[^=])")
    offenders = [f"{name}:{text[:match.start()].count(chr(10)) + 1}" for name, text in sources(*FOLDERS).items()
                 if name not in SYS_PATH_ALLOWED for match in edits.finditer(text)]
    assert not offenders, offenders


def test_tools_and_bench_use_the_core_not_the_node_modules():
    """The streaming run, the new adapter and the like live in nodes/ modules the nodes and the tools share; a tool
    that imports a node module (nodes/*_nodes.py) depends on ComfyUI's node registration."""
    offenders = []
    for name, text in sources("tools", "bench").items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            offenders += [f"{name}:{node.lineno} {module}" for module in modules
                          if re.fullmatch(r"comfyui_litevsr\.nodes\.\w+_nodes", module)]
    assert not offenders, offenders


def private_uses(text):
    """(line, what) for each private name of an own module (tools, bench, the pack, a test helper) this code uses:
    `from m import _x`, `m._x` where `m` is a name imported from an own module, `setattr(m, "_x", ...)`."""
    tree = ast.parse(text)
    imported = set()  # local names bound to own modules (or to names taken from them)
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {(alias.asname or alias.name).split(".")[0] for alias in node.names if own(alias.name)}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and own(node.module):
            imported |= {alias.asname or alias.name for alias in node.names}
            uses += [(node.lineno, f"from {node.module} import {alias.name}") for alias in node.names
                     if private(alias.name)]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in imported:
                uses.append((node.lineno, ast.unparse(node)))
        elif (isinstance(node, ast.Call) and "setattr" in (getattr(node.func, "attr", None),
                                                            getattr(node.func, "id", None))
              and len(node.args) >= 2 and isinstance(node.args[0], ast.Name) and node.args[0].id in imported
              and isinstance(node.args[1], ast.Constant) and private(str(node.args[1].value))):
            uses.append((node.lineno, f"setattr({node.args[0].id}, {node.args[1].value!r})"))
    return sorted(uses)


def test_private_uses_finds_each_form():
    code = ("from tools.comfy_server import _one_line\nfrom tools import demo\nimport comfyui_litevsr.nodes.core\n"
            "import json\nfrom conftest import REPO\n"
            "demo._make()\ncomfyui_litevsr.nodes.core.memory._fmt(1)\njson._default_decoder\n"
            "monkeypatch.setattr(demo, '_x', 1)\nREPO.__class__\nsetattr(demo, '_y', 2)\n")
    assert [line for line, _ in private_uses(code)] == [1, 6, 7, 9, 11]


def test_no_module_uses_a_private_name_of_another():
    offenders = [f"{name}:{line} {what}" for name, text in sources(*FOLDERS).items()
                 for line, what in private_uses(text)]
    assert not offenders, offenders
