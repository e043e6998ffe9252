"""Train a LiteVSR State-Aware Adapter on a frozen Wan DiT from a folder of videos, in this process (no server).

    python -m tools.train --data videos/ --out adapter.safetensors --steps 2000 --dit wan_dit.safetensors \
        --vae wan_vae.safetensors [--validation-data held_out/] [--scale 4] [--clip-frames 5] [--crop 64x64] \
        [--preset light] [--batch-size 1] [--grad-accumulation 1] [--lr 1e-4] [--max-unrolls 3] [--seed 0] \
        [--start noise|lr_latent] [--checkpoint-every 0] [--validation-every 0] [--init-adapter start.safetensors]
    python -m tools.train ... --resume                      # continue from the newest checkpoint
    python -m tools.train --data videos/ --out a.safetensors --steps 20 --stand-ins   # tiny random-weight models
    torchrun --nproc_per_node=K -m tools.train ... --batch-size B    # K data-parallel processes
    python -m tools.train --teacher adapter.safetensors --teacher-steps 4 --data videos/ --out student.safetensors ...
                                                            # distil a one-step student from an N-step teacher

The run is the one the "Train State-Aware Adapter" node runs (nodes/training_run.py train_adapter): the DiT and VAE are
loaded as ComfyUI's stock "Load Diffusion Model" and "Load VAE" nodes load them and stay frozen, HR clips from
--data are degraded on the fly (--preset), and only the adapter is trained. Checkpoints (adapter + optimizer state)
go to `<OUT>.checkpoints/` beside OUT, at the end and every --checkpoint-every steps; --resume continues from the
newest one and ends where an uninterrupted run with the same settings ends. The result is OUT (an adapter file for
"Attach State-Aware Adapter") and OUT.log.json: the settings, every step's training loss (from step 1, also for a
resumed run), the held-out validation losses of this run, the number of processes and the step resumed from.

Under torchrun (RANK / WORLD_SIZE set) every process loads the models and trains on its share of each global batch
(gloo on CPUs, nccl with one GPU per process); gradients are summed over the processes every step. --batch-size is
per process: the global batch is batch_size x grad_accumulation x processes clips, and every clip is a function of
(seed, its index in the run), so K processes with --batch-size B/K train what one process with --batch-size B
trains. Only rank 0 writes checkpoints, OUT and the log.

With --teacher the run distils instead (nodes/distillation.py, the "Distil One-Step Adapter" node's run): the student
starts as the teacher adapter and learns to reach the teacher's --teacher-steps output in one step, with the
feature- and pixel-domain discriminators (--feature-weight, --pixel-weight, ...; core/distill.py). Checkpoints
include both discriminators; OUT's metadata records the teacher (file name, SHA-256, steps); every step in the log
also has the loss parts (regression, generator and discriminator losses); validation is the held-out latent MSE to
the teacher's output.
"""
import argparse
import dataclasses
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from tools import comfy_env, comfy_server
from tools.headless import (Ranks, add_model_arguments, build_stand_ins, check_model_arguments, load_models,
                            load_text_encoder, run_headless, stand_in_banner)

STAND_IN_BANNER = stand_in_banner("--stand-ins", "the training loop; the adapter fits those stand-ins, not a real Wan")
CHECKPOINTS_SUFFIX = ".checkpoints"
LOG_SUFFIX = ".log.json"
STAND_IN_DIT = {"dit_dim": 128, "head_std": 128 ** -0.5}  # an output scale an adapter can steer (tiny_models)


def checkpoint_folder(out):
    return Path(f"{out}{CHECKPOINTS_SUFFIX}")


def log_path(out):
    return Path(f"{out}{LOG_SUFFIX}")


def crop_size(text):
    """'WxH' or 'N' (square) -> (height, width)."""
    width, _, height = text.lower().partition("x")
    try:
        width, height = int(width), int(height or width)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WxH (e.g. 64x64) or a single size") from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"crop {text!r} must be positive")
    return height, width


def parse_args(argv=None):
    ap = argparse.ArgumentParser(usage="%(prog)s --data DIR --out FILE.safetensors --steps N [--resume] "
                                       "(--dit FILE --vae FILE | --stand-ins) [options]",
                                 description="LiteVSR: train a State-Aware Adapter headless (torchrun: data "
                                             "parallel)")
    ap.add_argument("--data", required=True, help="folder of HR training videos (searched recursively)")
    ap.add_argument("--out", required=True, help="the trained adapter (.safetensors); also OUT.log.json and the "
                                                 f"checkpoint folder OUT{CHECKPOINTS_SUFFIX}/")
    ap.add_argument("--steps", type=int, required=True, help="optimizer steps in all (a resumed run included)")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in "
                                                          f"OUT{CHECKPOINTS_SUFFIX}/ (from scratch if none)")
    add_model_arguments(ap, "training loop demonstration")
    ap.add_argument("--validation-data", help="folder of held-out videos; default: a separate random stream of "
                                              "clips from --data")
    ap.add_argument("--scale", type=int, default=4, help="LR = HR / scale: the upscale factor the adapter learns")
    ap.add_argument("--clip-frames", type=int, default=5, help="frames per training clip (4n+1)")
    ap.add_argument("--crop", type=crop_size, default=(64, 64), metavar="WxH",
                    help="HR crop in pixels (a multiple of the DiT's 16 or 32 px grid and of --scale); default 64x64")
    ap.add_argument("--frame-stride", type=int, default=1, help="take every n-th frame")
    ap.add_argument("--preset", default="light", help="degradation preset: light, standard or heavy")
    ap.add_argument("--batch-size", type=int, default=1, help="clips per forward pass in each process")
    ap.add_argument("--grad-accumulation", type=int, default=1, help="forward passes per optimizer step")
    ap.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm; 0: off")
    ap.add_argument("--max-unrolls", type=int, default=3, help="M_max of the adaptive unrolling schedule; 1: off")
    ap.add_argument("--timestep-sampling", default="shifted", help="shifted, logit_normal or uniform")
    ap.add_argument("--shift", type=float, default=5.0, help="time shift of --timestep-sampling shifted")
    ap.add_argument("--loss-weighting", default="litevsr", help="weight on the clean-latent error: litevsr "
                                                                "(sigma^-2, the velocity MSE, clamped) or none (1)")
    ap.add_argument("--max-loss-weight", type=float, default=100.0, help="clamp of sigma^-2")
    add_start_arguments(ap)
    ap.add_argument("--seed", type=int, default=0, help="clips, crops, degradations, noise and the new adapter")
    ap.add_argument("--precision", default="auto", help="GPU autocast: auto, bf16, fp16 or fp32 (CPU: fp32)")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="recompute the frozen blocks in backward: much less memory, about 30%% slower")
    ap.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps (0: at the end "
                                                                    "only)")
    ap.add_argument("--keep-checkpoints", type=int, default=3, help="newest checkpoints kept (0: all)")
    ap.add_argument("--validation-every", type=int, default=0, help="held-out validation loss every N steps (0: "
                                                                    "before and after only)")
    ap.add_argument("--validation-clips", type=int, default=1, help="held-out clips (each at 4 noise levels)")
    ap.add_argument("--log-every", type=int, default=1, help="print the loss every N steps")
    ap.add_argument("--init-adapter", help="start from this adapter file (fine-tune) instead of a new one")
    ap.add_argument("--injection", default="direct", help="new adapter only: direct or shared_blocks")
    ap.add_argument("--adapter-rank", type=int, default=0, help="new adapter only: low-rank injection rank (0: full)")
    add_distill_arguments(ap)
    args = ap.parse_args(argv)
    check_model_arguments(ap, args)
    if args.teacher and args.init_adapter:
        ap.error("--teacher: the student starts as the teacher; leave out --init-adapter")
    if args.teacher and args.start != "noise":
        ap.error("--teacher: the one-step student starts from noise; leave out --start")
    if args.teacher and args.segments != 1:
        ap.error("--teacher: distillation trains one-step clips; leave out --segments")
    try:
        distill_config(args, comfy_env.core_module("distill"))
    except ValueError as invalid:
        ap.error(str(invalid))
    for option, folder in (("--data", args.data), ("--validation-data", args.validation_data)):
        if folder is not None and not Path(folder).is_dir():
            ap.error(f"{option} {folder}: no such folder")
    for option, path in (("--dit", args.dit), ("--vae", args.vae), ("--init-adapter", args.init_adapter),
                         ("--teacher", args.teacher)):
        if path is not None and not Path(path).is_file():
            ap.error(f"{option} {path}: no such file")
    if Path(args.out).suffix != ".safetensors":
        ap.error(f"--out {args.out}: the adapter is written as .safetensors; name it so")
    if args.log_every < 1 or args.validation_clips < 1:
        ap.error("--log-every and --validation-clips must each be at least 1")
    return args


def add_start_arguments(ap):
    """--start, --start-sigma: the sampler's start the adapter is trained for; --segments, --segment-overlap: whether
    it trains as a long video's next chunk (names and defaults from core)."""
    training = comfy_env.core_module("training")  # before ComfyUI: see comfy_env.core_module
    defaults = training.TrainConfig()
    ap.add_argument("--start", default=defaults.start, choices=training.START_MODES,
                    help="the sampler start to train for: noise (sigma 1) or lr_latent (the LR latent as the state "
                         f"at --start-sigma, InfVSR/DOVE style); default {defaults.start}")
    ap.add_argument("--start-sigma", type=float, default=defaults.start_sigma,
                    help="with --start lr_latent: the noise level the LR latent is taken as; training sigmas are "
                         f"drawn below it (default {defaults.start_sigma}, the sampler's)")
    ap.add_argument("--segments", type=int, default=defaults.segments, choices=(1, 2),
                    help="2: each clip is two consecutive segments, the second trained as a long video's next chunk "
                         "(the first's finished frames as known frames, its memory); trains the adapter's memory "
                         f"of earlier chunks (default {defaults.segments})")
    ap.add_argument("--segment-overlap", type=int, default=defaults.segment_overlap,
                    help=f"with --segments 2: latent frames the segments share (default {defaults.segment_overlap})")


def add_distill_arguments(ap):
    """--teacher, and an option per DistillConfig field (its default and meaning from core/distill.py)."""
    distill = comfy_env.core_module("distill")  # before ComfyUI: see comfy_env.core_module
    group = ap.add_argument_group("distillation (with --teacher)")
    group.add_argument("--teacher", help="distil a one-step student from this adapter file (the teacher, run at "
                                         "--teacher-steps); the student starts as a copy of it")
    for field in dataclasses.fields(distill.DistillConfig):
        group.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default,
                           help=f"{distill.SETTING_HELP[field.name]} (default {field.default})")


def distill_config(args, core=None):
    """The DistillConfig of the arguments (of `core`'s distill module: at parse time the standalone core's)."""
    if core is None:
        from comfyui_litevsr.nodes.core import distill as core
    return core.DistillConfig(**{field.name: getattr(args, field.name)
                                 for field in dataclasses.fields(core.DistillConfig)})


# --- the run ----------------------------------------------------------------------------------------------------

def train_config(args):
    from comfyui_litevsr.nodes.core.training import TrainConfig

    return TrainConfig(steps=args.steps, learning_rate=args.lr, weight_decay=args.weight_decay,
                       batch_size=args.batch_size, grad_accumulation=args.grad_accumulation,
                       timestep_sampling=args.timestep_sampling, shift=args.shift, max_unrolls=args.max_unrolls,
                       loss_weighting=args.loss_weighting, max_loss_weight=args.max_loss_weight,
                       grad_clip=args.grad_clip, seed=args.seed, start=args.start, start_sigma=args.start_sigma,
                       segments=args.segments, segment_overlap=args.segment_overlap)


def run_description(args):
    """What, besides the TrainConfig, makes this run (recorded in the checkpoints, OUT and the log)."""
    return {"data": str(Path(args.data).resolve()),
            "validation_data": args.validation_data and str(Path(args.validation_data).resolve()),
            "scale": args.scale, "clip_frames": args.clip_frames, "crop": f"{args.crop[1]}x{args.crop[0]}",
            "frame_stride": args.frame_stride, "preset": args.preset,
            "dit": "stand-in" if args.stand_ins else str(Path(args.dit).resolve()),
            "vae": "stand-in" if args.stand_ins else str(Path(args.vae).resolve()),
            "init_adapter": args.init_adapter and str(Path(args.init_adapter).resolve()),
            "injection": args.injection, "adapter_rank": args.adapter_rank, "precision": args.precision,
            "gradient_checkpointing": args.gradient_checkpointing,
            **({"teacher": str(Path(args.teacher).resolve()), "distill": distill_config(args).to_dict()}
               if args.teacher else {})}


def decisive_settings(record):
    """What decides what each step trains, from a run record (`run_metadata`): per-process batch sizes only as the
    global batch they make; neither the starting adapter (a checkpoint exists) nor gradient checkpointing."""
    config = dict(record.get("config", {}))
    global_batch = config.pop("batch_size", 1) * record.get("processes", 1)
    config.pop("steps", None)
    run = {key: value for key, value in record.get("run", {}).items()
           if key not in ("init_adapter", "injection", "adapter_rank", "gradient_checkpointing")}
    return {**config, **run, "global_batch": global_batch}


def check_checkpoints(folder, resume, record, ranks):
    """The checkpoint this run resumes from (None: a fresh start); refuses to mix a fresh run into old checkpoints,
    and warns where a resumed run trains otherwise than the run it continues."""
    from comfyui_litevsr.nodes.core.adapter_file import read_header
    from comfyui_litevsr.nodes.core.checkpoint import checkpoint_paths, resume_step

    step = resume_step(folder, resume, record["config"]["steps"])  # refused here, before the models load
    if step is None:
        if resume:
            ranks.say(f"--resume: no checkpoint in {folder} yet, starting from step 0")
        return None
    metadata = read_header(str(checkpoint_paths(folder, step)[1])).get("__metadata__") or {}
    saved, now = decisive_settings(json.loads(metadata.get("run", "{}"))), decisive_settings(record)
    changed = sorted(key for key in now if saved.get(key) != now[key])
    if changed:
        ranks.say(f"warning: resuming step {step} with other settings than it was trained with: "
                  + ", ".join(f"{key} {saved.get(key)} -> {now[key]}" for key in changed))
    return step


def progress_hooks(ranks, every):
    """Loss lines (rank 0), and Ctrl-C as Cancel in the UI: the run stops after the current step, checkpointed first
    (train_adapter does that on an interrupt); a second Ctrl-C stops at once."""
    from comfyui_litevsr.nodes.training_run import Hooks

    class Progress(Hooks):
        last = None  # (step, time) the step time is measured from: the last line printed
        stop = False

        def __init__(self):
            signal.signal(signal.SIGINT, self._stop_after_step)

        def _stop_after_step(self, signum, frame):
            self.stop = True
            signal.signal(signal.SIGINT, signal.default_int_handler)

        def check_interrupt(self):
            if self.stop:
                raise KeyboardInterrupt
            super().check_interrupt()

        def on_step(self, step, total, loss):
            if step % every == 0 or step == total:
                now = time.monotonic()
                ranks.say(f"step {step}/{total}  loss {loss:.6f}  ({(now - self.last[1]) / (step - self.last[0]):.2f}"
                          " s/step)")
                self.last = (step, now)

        def on_validation(self, step, loss, denoise, samples):
            ranks.say(f"validation at step {step}: loss {loss:.6f}")
            self.last = (step, time.monotonic())

    return Progress()


def starting_point(model, args):
    """(adapter, text context, objective): the adapter training starts from and the run's context
    (adapters.text_context: --text-encoder, else the file's, else zeros); for --teacher the teacher, which the
    distillation objective also keeps frozen, with its own stored context."""
    from comfyui_litevsr.nodes.adapters import adapter_from_file, text_context
    from comfyui_litevsr.nodes.backbone import backbone_signature
    from comfyui_litevsr.nodes.core.training import velocity_loss
    from comfyui_litevsr.nodes.distillation import DistillObjective

    start = args.teacher or args.init_adapter
    signature = backbone_signature(model)
    adapter, stored = adapter_from_file(signature, start, args.injection, args.adapter_rank, args.seed)
    context = text_context(signature, text_encoder=load_text_encoder(args.text_encoder), stored=stored)
    if not args.teacher:
        return adapter, context, velocity_loss
    return adapter, context, DistillObjective(adapter, stored, distill_config(args), args.teacher)


def write_json(path, data):
    """Atomically: a temporary file in the same folder, renamed."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(temporary, path)


def run(args, ranks):
    from comfyui_litevsr.nodes.core.adapter_file import save_adapter
    from comfyui_litevsr.nodes.core.dataset import VideoClipDataset
    from comfyui_litevsr.nodes.core.degrade import DegradationConfig
    from comfyui_litevsr.nodes.core.training import World
    from comfyui_litevsr.nodes.training_run import RunSettings, train_adapter

    t0 = time.monotonic()
    out = Path(args.out).resolve()
    folder = checkpoint_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = train_config(args)
    degradation = DegradationConfig.preset(args.preset)
    run_info = run_description(args)
    record = {"config": config.to_dict(), "run": run_info, "processes": ranks.world}  # in every checkpoint
    resume_step = check_checkpoints(folder, args.resume, record, ranks)
    dataset = VideoClipDataset(args.data, args.clip_frames, args.crop, args.frame_stride, args.seed)
    validation = args.validation_data and VideoClipDataset(args.validation_data, args.clip_frames, args.crop,
                                                           args.frame_stride, args.seed)
    ranks.say(f"{len(dataset.videos)} training videos in {args.data}"
              + (f", {len(validation.videos)} held out in {args.validation_data}" if validation else ""))

    # the stand-in files outlive the run: newer ComfyUI reloads the DiT from its file for training (force_deepcopy)
    with tempfile.TemporaryDirectory(prefix="litevsr-stand-ins-") as scratch:
        dit_path, vae_path = build_stand_ins(scratch, **STAND_IN_DIT) if args.stand_ins else (args.dit, args.vae)
        model, vae = load_models(dit_path, vae_path)
        adapter, context, objective = starting_point(model, args)
        ranks.say(f"models loaded in {time.monotonic() - t0:.1f} s", everyone=ranks.shared)

        settings = RunSettings(checkpoint_dir=str(folder), checkpoint_every=args.checkpoint_every,
                               keep_checkpoints=args.keep_checkpoints, resume=resume_step is not None,
                               validation_every=args.validation_every, validation_clips=args.validation_clips,
                               gradient_checkpointing=args.gradient_checkpointing, precision=args.precision,
                               run_metadata=record)
        global_batch = config.batch_size * config.grad_accumulation * ranks.world
        ranks.say(f"training {config.steps} steps" + (f" from checkpoint step {resume_step}" if resume_step else "")
                  + f": global batch {global_batch} clips ({config.batch_size} per pass x {config.grad_accumulation} "
                  f"accumulated x {ranks.world} process{'es' if ranks.shared else ''}), {args.clip_frames} frames "
                  f"{args.crop[1]}x{args.crop[0]}, x{args.scale} {args.preset} degradation")
        result = train_adapter(model, vae, dataset, degradation, args.scale, config, adapter, context, settings,
                               validation, World(ranks.rank, ranks.world), progress_hooks(ranks, args.log_every),
                               objective)
    seconds = round(time.monotonic() - t0, 1)
    if ranks.rank != 0:
        return None

    save_adapter(out, result.adapter, result.context,
                 {"train_steps": str(config.steps), "train_config": json.dumps(config.to_dict(), sort_keys=True),
                  "train_run": json.dumps(run_info, sort_keys=True), "train_processes": str(ranks.world),
                  **(objective.student_metadata() if args.teacher else {})})
    parts = result.loss_parts
    log = {**record, "resumed_from": result.resumed_from, "seconds": seconds,
           "steps": [{"step": step, "loss": loss, **{name: values[step - 1] for name, values in parts.items()}}
                     for step, loss in enumerate(result.losses, 1)],
           "validation": [{"step": step, "loss": loss} for step, loss in result.validation]}
    write_json(log_path(out), log)
    ranks.say("validation loss " + ", ".join(f"step {step}: {loss:.6f}" for step, loss in result.validation))
    ranks.say(f"wrote {out} and {log_path(out).name} ({config.steps} steps, {ranks.world} process"
              f"{'es' if ranks.shared else ''}, {seconds} s; checkpoints in {folder})")
    return log


def main(argv=None):
    args = parse_args(argv)
    ranks = Ranks(tool="train")
    if args.stand_ins:
        ranks.say(STAND_IN_BANNER)
    try:  # on failure no OUT and no log: both only ever appear complete
        return run_headless(ranks, lambda: run(args, ranks))
    except (KeyboardInterrupt, SystemExit) as stop:  # Ctrl-C, or SIGTERM / SIGHUP (comfy_server.exit_on_signals)
        ranks.say(f"interrupted: --resume continues from the newest checkpoint in {checkpoint_folder(args.out)}")
        return 130 if isinstance(stop, KeyboardInterrupt) else stop.code


if __name__ == "__main__":
    comfy_server.exit_on_signals()
    sys.exit(main())
