"""What the headless tools (tools/upscale.py, tools/train.py) share: this process's place among torchrun's processes,
the run with torch.distributed and ComfyUI set up, the model options, and the models (real files, or tiny
random-weight stand-ins) loaded as ComfyUI's stock loader nodes load them. Also the notice every tool prints before
and after a run on stand-ins (tools/demo.py and bench/eval.py too).
"""
import datetime
import os
import sys
from pathlib import Path

from tools import comfy_server


def stand_in_banner(reason, demonstrates="the pipeline; it is not an upscale"):
    """The notice printed before and after a run on stand-ins: what it is, and that its output means nothing."""
    return (f"NOTE: {reason}: tiny RANDOM-WEIGHT Wan stand-ins instead of real models. The output only demonstrates "
            f"{demonstrates}.")


class Ranks:
    """This process's place among torchrun's processes (rank 0 of 1 without torchrun)."""

    def __init__(self, environ=os.environ, tool="upscale"):
        self.tool = tool  # names this tool in printed lines
        self.rank = int(environ.get("RANK", 0))
        self.world = int(environ.get("WORLD_SIZE", 1))
        self.local_rank = int(environ.get("LOCAL_RANK", 0))
        self.local_world = int(environ.get("LOCAL_WORLD_SIZE", self.world))
        self.shared = self.world > 1

    def say(self, message, everyone=False):
        if self.rank == 0 or everyone:
            prefix = f"[{self.tool} rank {self.rank}/{self.world}]" if self.shared else f"[{self.tool}]"
            print(f"{prefix} {message}", flush=True)


# --- the run ----------------------------------------------------------------------------------------------------

def init_distributed(ranks):
    """torch.distributed from torchrun's environment: nccl with one GPU per local rank, gloo on the CPU."""
    import torch
    import torch.distributed as dist

    if not ranks.shared:
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(ranks.local_rank)  # before ComfyUI picks its device (the current CUDA device)
        backend = "nccl"
    else:
        backend = "gloo"
    # Generous: rank 0 plans (a scene-cut pass over the whole video) while the others wait for the plan.
    dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))


def run_headless(ranks, work):
    """Calls `work()` with torch.distributed up (under torchrun) and ComfyUI set up. Returns 0, or 1 after one line
    on stderr (`<tool> failed [on rank N]: Type: message`); the process group is destroyed either way."""
    init_distributed(ranks)
    try:
        from tools import comfy_env

        comfy_env.setup()
        work()
    except Exception as e:
        print(f"{ranks.tool} failed{f' on rank {ranks.rank}' if ranks.shared else ''}: "
              f"{comfy_server.one_line(f'{type(e).__name__}: {e}')}", file=sys.stderr, flush=True)
        return 1
    finally:
        if ranks.shared:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    return 0


# --- models -----------------------------------------------------------------------------------------------------

def add_model_arguments(ap, demonstrates):
    """--dit and --vae (real model files), or --stand-ins (tiny random-weight models, `demonstrates` what)."""
    ap.add_argument("--dit", help="Wan DiT file (as for ComfyUI's Load Diffusion Model)")
    ap.add_argument("--vae", help="Wan VAE file (as for ComfyUI's Load VAE)")
    ap.add_argument("--stand-ins", action="store_true", help=f"tiny random-weight models ({demonstrates})")
    ap.add_argument("--text-encoder", metavar="FILE",
                    help="Wan's umt5_xxl text encoder (as for ComfyUI's Load CLIP, type wan): the text context is "
                         "its empty-prompt embedding; default: the context stored in the adapter file, else an "
                         "all-zero one (only right for stand-ins)")


def check_model_arguments(ap, args):
    if args.stand_ins and (args.dit or args.vae):
        ap.error("--stand-ins builds its own models: leave out --dit and --vae")
    if not args.stand_ins and not (args.dit and args.vae):
        ap.error("--dit and --vae are required (or --stand-ins for tiny random-weight models)")


def build_stand_ins(folder, dit_dim=256, head_std=None):
    """Tiny random-weight Wan2.1 DiT and VAE files (deterministic: every rank builds the same ones). `head_std`: see
    tiny_models.tiny_wan_dit_state_dict (training uses dim 128 and 1/sqrt(128), so an adapter can steer it)."""
    from tools import tiny_models

    return tiny_models.save_stand_ins(Path(folder) / "tiny_wan21_dit.safetensors",
                                      Path(folder) / "tiny_wan21_vae.safetensors", dit_dim, head_std)


def build_infvsr_stand_ins(folder):
    """Tiny random-weight InfVSR files in InfVSR's formats (pickled DiT, RAM and DAPE), and a Wan2.1 VAE:
    (dit, vae, ram, dape) paths."""
    from tools import tiny_models

    return tiny_models.save_infvsr_stand_ins(Path(folder) / "InfVSR.ckpt", Path(folder) / "tiny_wan21_vae.safetensors",
                                             folder)


def load_models(dit_path, vae_path):
    """As ComfyUI's stock UNETLoader and VAELoader load them."""
    import comfy.sd

    return comfy.sd.load_diffusion_model(str(dit_path)), load_vae(vae_path)


def load_text_encoder(path):
    """As ComfyUI's stock CLIPLoader loads a file with type wan; None without a path."""
    import comfy.sd

    return comfy.sd.load_clip([str(path)], clip_type=comfy.sd.CLIPType.WAN) if path else None


def load_vae(path):
    """As ComfyUI's stock VAELoader loads a file (a Wan VAE, or a tiny / light Wan decoder)."""
    import comfy.sd
    import comfy.utils

    sd, metadata = comfy.utils.load_torch_file(str(path), return_metadata=True)
    vae = comfy.sd.VAE(sd=sd, metadata=metadata)
    if hasattr(vae, "throw_exception_if_invalid"):
        vae.throw_exception_if_invalid()
    return vae
