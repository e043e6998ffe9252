"""ComfyUI in this process, without a server: its source tree on sys.path, CPU mode where CUDA is missing, and
this pack imported as the package `comfyui_litevsr` (whatever its folder is called).

Used by the tests (tests/conftest.py) and the headless tools (tools/upscale.py). Call `setup()` before anything
imports `comfy.model_management`: ComfyUI reads its arguments once, when that module is first imported.
"""
import importlib.util
import sys
from pathlib import Path

from tools.comfy_server import REPO, comfy_dir

PACKAGE = "comfyui_litevsr"  # the pack under a fixed name, whatever its folder is called


def setup(cpu=None):
    """ComfyUI as `use_comfy` leaves it, and the pack imported. Returns the pack's module. Idempotent."""
    use_comfy(cpu)
    return import_pack()


def use_comfy(cpu=None):
    """Puts ComfyUI (`$COMFYUI_PATH`, else the repo's `.comfyui` link) on sys.path and selects CPU mode when CUDA is
    unavailable (or `cpu=True`). Idempotent. The one sys.path entry the tools make: ComfyUI's source tree is no
    package (its modules are top-level: `comfy`, `nodes`, `folder_paths`, ...)."""
    comfy = str(comfy_dir())
    if not Path(comfy, "comfy").is_dir():
        raise FileNotFoundError(f"no ComfyUI source tree at {comfy}: run `make env` or set COMFYUI_PATH")
    if comfy not in sys.path:
        sys.path.insert(0, comfy)

    import torch
    import comfy.cli_args

    if "comfy.model_management" not in sys.modules and (cpu if cpu is not None else not torch.cuda.is_available()):
        comfy.cli_args.args.cpu = True  # ComfyUI would otherwise probe CUDA with this CUDA build of torch
        comfy.cli_args.args.use_pytorch_cross_attention = True  # SDPA; ComfyUI's CPU default is far slower


def import_pack():
    """The pack as package `comfyui_litevsr` (its nodes then import as `comfyui_litevsr.nodes...`)."""
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    spec = importlib.util.spec_from_file_location(PACKAGE, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[PACKAGE]
        raise
    return module


CORE_PACKAGE = "litevsr_core"


def core_module(name):
    """Module `nodes/core/<name>.py` without ComfyUI (the core imports none of it), for what a tool needs before
    ComfyUI may be set up (argument parsing under torchrun comes before each process picks its GPU). Loaded as
    package `litevsr_core`: its classes are not the pack's own (`comfyui_litevsr.nodes.core...`); use it for
    names, defaults and help texts only."""
    if CORE_PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(CORE_PACKAGE, REPO / "nodes" / "core" / "__init__.py",
                                                      submodule_search_locations=[str(REPO / "nodes" / "core")])
        package = importlib.util.module_from_spec(spec)
        sys.modules[CORE_PACKAGE] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{CORE_PACKAGE}.{name}")
