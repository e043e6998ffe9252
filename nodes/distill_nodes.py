"""One-step distillation as a node: a teacher adapter file -> Distil One-Step Adapter -> Save Adapter (+ Plot Loss).
The node is the Train node's run (train_nodes.run_training) with the distillation objective (distillation.py)."""
import json
from dataclasses import fields

import folder_paths
from comfy_api.latest import io

from .adapters import adapter_path
from .backbone import backbone_signature
from .core.adapter_file import load_adapter
from .core.distill import ADVERSARIAL_LOSSES, DISCRIMINATORS, REAL_TARGETS, DistillConfig
from .distillation import DistillObjective
from .extension_paths import ADAPTER_FOLDER
from .train_nodes import ADAPTER, LOSS_MAP, loss_map, run_training, timestep_inputs, trained_adapter, training_inputs

DEFAULTS = DistillConfig()
DISTILL_INPUTS = tuple(f.name for f in fields(DistillConfig))
WEIGHTS = {  # the loss weights, each 0 and up
    "teacher_weight": "Weight of the regression (latent MSE) of the student's one-step output to the teacher's N-step "
                      "output.",
    "hr_weight": "Weight of a regression to the HR clip's latent as well; 0: learn from the teacher alone. "
                 "teacher_weight or hr_weight must be above 0.",
    "feature_weight": "Weight of the feature-domain adversarial loss: a light dual head on the frozen DiT's first "
                      "feature_blocks blocks; 0 turns that discriminator off.",
    "pixel_weight": "Weight of the pixel-domain adversarial loss: a small conv discriminator on decoded frames (a "
                    "centre crop); 0 turns it off.",
    "r1_weight": "R1 gradient penalty on the discriminators' real inputs, keeps them smooth; 0: off.",
}


def ours(name, tooltip):
    """`tooltip` with DistillConfig's default for `name`, a setting of our choosing."""
    return f"{tooltip} (default {getattr(DEFAULTS, name)}: our choice)"


def distill_inputs():
    """An input per DistillConfig field, defaulting to DistillConfig's."""
    d = DEFAULTS
    return [
        io.Int.Input("teacher_steps", default=d.teacher_steps, min=2, max=100,
                     tooltip=ours("teacher_steps", "Steps of the teacher's sampler: the quality the student learns "
                                                   "to reach in one step; the step count the teacher is best at.")),
        io.Float.Input("teacher_shift", default=d.teacher_shift, min=1.0, max=20.0, step=0.1,
                       tooltip=ours("teacher_shift", "Sampling shift of the teacher's schedule (as the Sampler's "
                                                     "shift you would run the teacher with).")),
        *[io.Float.Input(name, default=getattr(d, name), min=0.0, max=100.0, step=0.01, tooltip=ours(name, tooltip))
          for name, tooltip in WEIGHTS.items()],
        io.Float.Input("detail_share", default=d.detail_share, min=0.05, max=0.95, step=0.05,
                       tooltip="Share of each discriminator head's channels that judge detail frame by frame; the "
                               "rest judge temporal consistency on frame differences. 0.75 is AdcVSR's best split "
                               "(75/25)."),
        io.Combo.Input("adversarial_loss", options=list(ADVERSARIAL_LOSSES), default=d.adversarial_loss,
                       tooltip=ours("adversarial_loss", "The GAN loss of student and discriminators.")),
        io.Combo.Input("real", options=list(REAL_TARGETS), default=d.real,
                       tooltip=ours("real", "What the discriminators take as real: teacher (its N-step output: pure "
                                            "distillation) or hr (the HR clip's latent).")),
        io.Float.Input("feature_sigma", default=d.feature_sigma, min=0.0, max=1.0, step=0.01,
                       tooltip=ours("feature_sigma", "Noise level at which the feature discriminator sees real and "
                                                     "fake (both noised with the same noise); 0: each sample's "
                                                     "training noise level, drawn by timestep_sampling and shift.")),
        io.Int.Input("feature_blocks", default=d.feature_blocks, min=1, max=64,
                     tooltip=ours("feature_blocks", "DiT blocks in the feature discriminator's trunk (at most the "
                                                    "DiT's: more are clamped); deeper features cost more compute.")),
        io.Int.Input("head_width", default=d.head_width, min=2, max=4096,
                     tooltip=ours("head_width", "Channels of each discriminator head.")),
        io.Int.Input("pixel_width", default=d.pixel_width, min=1, max=1024,
                     tooltip=ours("pixel_width", "Channels of the pixel discriminator's first conv.")),
        io.Int.Input("pixel_crop", default=d.pixel_crop, min=0, max=1024,
                     tooltip=ours("pixel_crop", "Latent pixels (each side) of the centre crop decoded for the pixel "
                                                "discriminator (16 = 128 px with the Wan2.1 VAE); 0: the whole clip, "
                                                "far more memory.")),
        io.Float.Input("discriminator_lr", default=d.discriminator_lr, min=1e-7, max=1.0, step=1e-7,
                       tooltip=ours("discriminator_lr", "AdamW learning rate of both discriminators.")),
    ]


class LiteVSRDistillAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LiteVSRDistillAdapter",
            display_name="Distil One-Step Adapter (LiteVSR)",
            category="LiteVSR/training",
            description="Distils a teacher adapter that is best at several steps into a student that gets there in "
                        "one: the student starts as a copy of the teacher and learns the teacher's N-step output "
                        "from its one step, with two dual-head discriminators (on the frozen DiT's features and "
                        "on decoded frames, each judging detail and temporal consistency). The DiT and VAE stay "
                        "unchanged. Checkpoints (student, optimizer, discriminators) go to "
                        "output/litevsr_training/<run_name>/ and `resume` continues from the newest one exactly.",
            inputs=training_inputs(
                [io.Combo.Input("teacher", options=folder_paths.get_filename_list(ADAPTER_FOLDER),
                                tooltip="The adapter file (models/litevsr) to distil, one that is best at several "
                                        "steps; the student starts as a copy of it, and its name and SHA-256 are "
                                        "recorded in the student's file.")],
                [*timestep_inputs("How training noise levels are drawn; only used with feature_sigma 0 (the "
                                  "feature discriminator then sees each sample's own level): the student always "
                                  "takes its one step from pure noise.",
                                  "Time shift of shifted timestep_sampling; only used with feature_sigma 0 (the "
                                  "teacher's sampling shift is teacher_shift)."),
                 *distill_inputs()]),
            outputs=[
                io.Model.Output(display_name="model", tooltip="The backbone with the one-step student attached "
                                                              "(sample it with steps = 1)."),
                ADAPTER.Output(display_name="adapter", tooltip="For 'Save Adapter (LiteVSR)': the file records that "
                                                               "it is one-step distilled, and from which teacher."),
                LOSS_MAP.Output(display_name="generator_loss",
                                tooltip="The student's loss per step (regression plus weighted adversarial terms), "
                                        "for 'Plot Loss Graph'."),
                *[LOSS_MAP.Output(display_name=f"{name}_discriminator_loss",
                                  tooltip=f"The {name} discriminator's loss per step; empty with {name}_weight 0 "
                                          "(leave it unconnected then: Plot Loss Graph cannot draw an empty map).")
                  for name in DISCRIMINATORS],
                LOSS_MAP.Output(display_name="validation_loss",
                                tooltip="Held-out latent MSE of the student's one step to the teacher's N steps, per "
                                        "validation."),
            ],
            hidden=[io.Hidden.unique_id],
            not_idempotent=True,
        )

    @classmethod
    def execute(cls, model, vae, dataset, degradation, teacher, **settings) -> io.NodeOutput:
        distill = DistillConfig(**{name: settings.pop(name) for name in DISTILL_INPUTS})
        path = adapter_path(teacher)
        start = load_adapter(path, backbone_signature(model))
        objective = DistillObjective(start[0], start[1], distill, path)
        config, result = run_training(getattr(cls.hidden, "unique_id", None), model, vae, dataset, degradation,
                                      start, objective=objective,
                                      run_metadata={"teacher": teacher, "distill": distill.to_dict()}, **settings)
        student = trained_adapter(config, result, {**objective.student_metadata(),
                                                   "distill_config": json.dumps(distill.to_dict())})
        return io.NodeOutput(result.model, student, loss_map(result.losses),
                             *[loss_map(result.loss_parts.get(f"{name}_discriminator", [])) for name in DISCRIMINATORS],
                             loss_map(loss for _, loss in result.validation))
