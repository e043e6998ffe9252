"""InfVSR's released pickles converted once to safetensors, so that nothing is unpickled again.

    python -m tools.infvsr convert InfVSR.ckpt models/diffusion_models/InfVSR.safetensors
    python -m tools.infvsr convert ram_swin_large_14m.pth models/infvsr/ram_swin_large_14m.safetensors
    python -m tools.infvsr convert DAPE.pth models/infvsr/DAPE.safetensors

The kind of file is told from its keys: the DiT keeps every tensor as stored, RAM keeps only its image encoder
(`visual_encoder.`, `image_proj.`, without the buffers the Swin module rebuilds), DAPE keeps everything. The input
is read only by the weights-only unpickler: a file holding anything but tensors exits 2 with one line, and nothing
is written. The output is written to a hidden temporary file in its folder and renamed; its metadata names the
source file and the kind. No ComfyUI is needed.
"""
import argparse
import os
import sys

import torch

from tools import comfy_env, comfy_server

comfy_env.import_pack()
from comfyui_litevsr.nodes.core.adapter_file import save_atomic  # noqa: E402
from comfyui_litevsr.nodes.core.infvsr_files import KIND_TITLES, infvsr_tensors  # noqa: E402
from comfyui_litevsr.nodes.core.pickle_file import read_tensor_pickle  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="LiteVSR: InfVSR's pickled weights to safetensors")
    commands = ap.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="convert one of InfVSR's .ckpt/.pth files to safetensors")
    convert.add_argument("input", help="InfVSR.ckpt, ram_swin_large_14m.pth or DAPE.pth")
    convert.add_argument("output", help="the .safetensors file to write")
    return ap.parse_args(argv)


def convert(source, target):
    """Writes the safetensors of `source` to `target`; returns the line that says what it was."""
    name = os.path.basename(source)
    kind, tensors = infvsr_tensors(read_tensor_pickle(source), name)
    # safetensors wants each tensor in a contiguous storage of its own; a pickle's tensors may share one (views)
    tensors = {key: tensor.clone(memory_format=torch.contiguous_format) for key, tensor in tensors.items()}
    save_atomic(tensors, target, {"source": name, "kind": kind})
    dtypes = sorted({str(tensor.dtype).removeprefix("torch.") for tensor in tensors.values()})
    return f"{name}: {KIND_TITLES[kind]}, {len(tensors)} tensors ({', '.join(dtypes)}) -> {target}"


def main(argv=None):
    args = parse_args(argv)
    try:
        print(convert(args.input, args.output))
    except (ValueError, OSError) as error:  # a refused pickle, none of InfVSR's files, an unwritable target
        print(error, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    comfy_server.exit_on_signals()  # SIGTERM/SIGHUP too remove the temporary output, as Ctrl-C does
    sys.exit(main())
