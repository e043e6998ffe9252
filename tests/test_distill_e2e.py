"""End to end on a real headless ComfyUI: the distillation example (Video Dataset -> Degradation -> Distil One-Step
Adapter -> Save Adapter, four Plot Loss Graphs) distils the served teacher stand-in (a steering adapter for the
stand-in DiT, in models/litevsr under the example's name) on a real clip folder; the student file records its teacher,
the checkpoints hold both discriminators."""
import hashlib
import json

import numpy as np
from safetensors import safe_open

from tools import demo as demo_tool
from workflows import EXAMPLES
from test_train_e2e import (STEPS, EVERY, checkpoint_dir, check_step_progress, cpu_prompt, loss_graphs, nodes_of,
                            run_training, saved_name, state_losses, train_folder)  # noqa: F401 (fixture)

from comfyui_litevsr.nodes.core.adapter_file import load_adapter

DISTILL_API = EXAMPLES / "api" / "litevsr_distill_api.json"
DISTILL = "LiteVSRDistillAdapter"
RUN_NAME = "e2e_distill"
PREFIX = "litevsr_e2e_distilled"
TEACHER_STEPS = 4


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_distillation_example_saves_a_student_that_names_its_teacher(comfy, train_folder):
    teacher = comfy.base / "models" / "litevsr" / demo_tool.TEACHER_NAME
    teacher_digest = sha256(teacher)
    prompt = cpu_prompt(DISTILL_API, DISTILL, PREFIX, run_name=RUN_NAME, feature_blocks=1)
    (_, node), = nodes_of(prompt, DISTILL)
    assert node["inputs"]["teacher"] == demo_tool.TEACHER_NAME and node["inputs"]["teacher_steps"] == TEACHER_STEPS
    entry, progress, seconds = run_training(comfy, prompt, DISTILL)
    print(f"\n[distill e2e] {STEPS} steps: {seconds:.1f} s; node times: "
          + ", ".join(f"{prompt[n]['class_type']} {t:.1f} s" for n, t in comfy.node_seconds.items() if n in prompt))

    # the student under the name the Save node returned: an adapter file recording its one-step distillation
    name = saved_name(prompt, entry)
    assert name == f"{PREFIX}_00001.safetensors", name
    path = comfy.base / "models" / "litevsr" / name
    student, _ = load_adapter(str(path))
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["distilled"]) == {"steps": 1, "teacher": demo_tool.TEACHER_NAME,
                                                 "teacher_sha256": teacher_digest, "teacher_steps": TEACHER_STEPS}
    assert metadata["train_steps"] == str(STEPS) and json.loads(metadata["distill_config"])["feature_blocks"] == 1
    # it started from the teacher and moved; the teacher file is untouched
    start, _ = load_adapter(str(teacher))
    moved = max(float((a - b).abs().max()) for a, b in zip(student.state_dict().values(), start.state_dict().values()))
    print(f"[distill e2e] largest |student - teacher| after {STEPS} steps: {moved:.2e}")
    assert moved > 0 and sha256(teacher) == teacher_digest

    # checkpoints every 2 steps, each with both discriminators, their optimizer and their loss history
    folder = checkpoint_dir(comfy, RUN_NAME)
    assert sorted(p.name for p in folder.iterdir()) == [f"step_{s:08d}{ext}" for s in (EVERY, STEPS)
                                                        for ext in (".safetensors", ".state.safetensors")]
    with safe_open(str(folder / f"step_{STEPS:08d}.state.safetensors"), "pt") as f:
        keys = set(f.keys())
        history = {name: f.get_tensor(f"objective.history.{name}").tolist()
                   for name in ("feature_discriminator", "pixel_discriminator")}
    discriminators = {key.split(".")[2] for key in keys if key.startswith("objective.discriminator.")}
    assert discriminators == {"feature", "pixel"}, sorted(keys)[:12]
    assert any(key.startswith("objective.discriminator_optimizer.") for key in keys)
    losses = state_losses(comfy, STEPS, RUN_NAME)
    print(f"[distill e2e] generator losses: {', '.join(f'{v:.4f}' for v in losses)}; discriminators: {history}")
    assert len(losses) == STEPS and all(np.isfinite(losses)), losses
    assert all(len(values) == STEPS and all(np.isfinite(values)) for values in history.values()), history

    # the four loss maps (generator, both discriminators, validation) reached Plot Loss Graph, and progress the editor
    assert loss_graphs(comfy, prompt, entry) == 4
    check_step_progress(progress, STEPS)
