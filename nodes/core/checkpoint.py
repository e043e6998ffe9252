"""Training checkpoints: the adapter file plus a sidecar with the optimizer and step state, both safetensors.

A checkpoint at step N is two files in one folder:
  step_00000N.safetensors        an ordinary adapter file (loadable by 'Attach State-Aware Adapter')
  step_00000N.state.safetensors  AdamW moments, the loss history; step, optimizer settings and run config as JSON
The sidecar is written first and the adapter file last, each to a hidden temporary file renamed into place, so a
process killed at any moment leaves either a complete new checkpoint or none: `latest_checkpoint` only returns
steps whose two files are both present, and the previous checkpoint is never touched until a newer one is whole.
What a killed write leaves (the hidden temporary file, a sidecar without its adapter file) is removed by the next
complete checkpoint.
"""
import json
import re
from pathlib import Path

from safetensors.torch import load_file

from .adapter_file import TEMPORARY_PREFIX, load_adapter, read_header, save_adapter, save_atomic

STATE_SUFFIX = ".state.safetensors"
TRAINING_OUTPUT = "litevsr_training"  # the Train node's checkpoints: output/litevsr_training/<run_name>/
_NAME = re.compile(r"^step_(\d{8})\.safetensors$")


def checkpoint_paths(folder, step):
    stem = Path(folder) / f"step_{step:08d}"
    return stem.with_suffix(".safetensors"), Path(f"{stem}{STATE_SUFFIX}")


def save_checkpoint(folder, trainer, context=None, run_metadata=None, keep=3):
    """Writes the checkpoint of the trainer's current step; keeps the newest `keep` checkpoints (0: all)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    adapter_path, state_path = checkpoint_paths(folder, trainer.step_count)
    run = json.dumps(run_metadata or {}, sort_keys=True)
    save_atomic(trainer.state_tensors(), state_path,
                 {"trainer": json.dumps(trainer.state_metadata(), sort_keys=True), "run": run})
    save_adapter(adapter_path, trainer.adapter, context, {"train_step": str(trainer.step_count), "run": run})
    if keep:
        for step in checkpoint_steps(folder)[:-keep]:
            for path in checkpoint_paths(folder, step):
                path.unlink(missing_ok=True)
    _remove_leftovers(folder)
    return adapter_path


def _remove_leftovers(folder):
    """Hidden temporary files and sidecars without an adapter file: what a process killed mid-write leaves. Only
    one process writes a run's checkpoints, so nothing else can be writing here now."""
    for path in Path(folder).iterdir():
        orphan = path.name.endswith(STATE_SUFFIX) and not path.with_name(
            path.name[:-len(STATE_SUFFIX)] + ".safetensors").exists()
        if orphan or (path.name.startswith(TEMPORARY_PREFIX) and path.name.endswith(".tmp")):
            path.unlink(missing_ok=True)


def checkpoint_steps(folder):
    """Steps with a complete checkpoint (both files), oldest first."""
    if not Path(folder).is_dir():
        return []
    steps = []
    for path in Path(folder).iterdir():
        match = _NAME.match(path.name)
        if match and checkpoint_paths(folder, int(match.group(1)))[1].exists():
            steps.append(int(match.group(1)))
    return sorted(steps)


def latest_checkpoint(folder):
    steps = checkpoint_steps(folder)
    return steps[-1] if steps else None


def resume_step(folder, resume, steps):
    """The step a run into `folder` continues from (None: a fresh start). Refuses a fresh run into a folder that
    holds checkpoints (the two runs would mix) and a resume past the `steps` asked for."""
    step = latest_checkpoint(folder)
    if step is not None and not resume:
        raise ValueError(f"{folder} already holds checkpoints up to step {step}: turn on resume to continue that "
                         "run (headless: add --resume, or RESUME=1), or train under a new run name or output file "
                         "(a new run there would mix with them)")
    if step is not None and step > steps:
        raise ValueError(f"the newest checkpoint in {folder} is at step {step}, past the {steps} steps asked for: "
                         f"set steps (--steps) to at least {step}")
    return step


def load_checkpoint(folder, step, signature=None):
    """(adapter, text context, trainer state tensors, trainer metadata, run metadata) of one checkpoint."""
    adapter_path, state_path = checkpoint_paths(folder, step)
    adapter, context = load_adapter(str(adapter_path), signature)
    metadata = read_header(str(state_path)).get("__metadata__") or {}
    return adapter, context, load_file(str(state_path)), json.loads(metadata["trainer"]), json.loads(metadata["run"])
