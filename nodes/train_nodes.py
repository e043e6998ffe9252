"""Adapter training as a node graph: Video Dataset -> Degradation -> Train Adapter -> Save Adapter (+ Plot Loss)."""
import json
import os
import re

import numpy as np
import torch
from PIL import Image

import comfy.utils
import folder_paths
from comfy_api.latest import io

from .adapters import adapter_from_choice, text_context
from .backbone import backbone_signature
from .core.adapter_file import save_adapter
from .core.dataset import VideoClipDataset
from .core.degrade import PRESETS, degrade_clip, with_overrides
from .core.sampling import START_MODES, flow_sigmas, sample_vsr
from .core.training import LOSS_WEIGHTINGS, TIMESTEP_SAMPLING, TrainConfig, velocity_loss
from .extension_paths import ADAPTER_FOLDER, TRAINING_OUTPUT
from .model_nodes import adapter_choice_inputs, context_inputs
from .progress import Eta, send_progress
from .training_run import PRECISIONS, Hooks, RunSettings, train_adapter

DATASET = io.Custom("LITEVSR_DATASET")
DEGRADATION = io.Custom("LITEVSR_DEGRADATION")
ADAPTER = io.Custom("LITEVSR_ADAPTER")
LOSS_MAP = io.Custom("LOSS_MAP")  # the type core 'Plot Loss Graph' reads: {"loss": [float, ...]}
TRAIN_DEFAULTS = TrainConfig()


def resolve_folder(folder):
    """An absolute folder, or one relative to ComfyUI's input directory."""
    folder = folder.strip()
    if not folder:
        raise ValueError("Video Dataset (LiteVSR): give the folder of HR training videos (absolute, or relative to "
                         "ComfyUI's input folder)")
    if os.path.isabs(folder):  # by design: the folder is only read, and training data often lives elsewhere
        return folder
    inputs = os.path.abspath(folder_paths.get_input_directory())
    resolved = os.path.abspath(os.path.join(inputs, folder))
    if os.path.commonpath((inputs, resolved)) != inputs:
        raise ValueError(f"Video Dataset (LiteVSR): the relative folder {folder!r} leads out of ComfyUI's input "
                         "folder; give a folder inside input/, or the folder's absolute path")
    return resolved


class LiteVSRVideoDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LiteVSRVideoDataset",
            display_name="Video Dataset (LiteVSR)",
            category="LiteVSR/training",
            description="A folder of high-resolution videos (mp4/mkv/mov/webm, animated webp) as random training "
                        "clips: a random file, start frame and crop per sample, reproducible from the seed. Files "
                        "too short or too small are skipped with one warning listing them.",
            inputs=[
                io.String.Input("folder", default="litevsr_train",
                                tooltip="Folder of HR videos, searched recursively: absolute, or relative to "
                                        "ComfyUI's input folder."),
                io.Int.Input("clip_frames", default=17, min=1, max=257, step=4,
                             tooltip="Frames per clip: 4n+1 (the Wan VAE's frame grid)."),
                io.Int.Input("width", default=256, min=16, max=4096, step=16,
                             tooltip="HR crop width in pixels: a multiple of 16 (Wan2.1) or 32 (Wan2.2) and of "
                                     "the degradation scale."),
                io.Int.Input("height", default=256, min=16, max=4096, step=16, tooltip="HR crop height in pixels."),
                io.Int.Input("frame_stride", default=1, min=1, max=16,
                             tooltip="Take every n-th frame (2 doubles the apparent motion)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Which clips and crops are drawn; the same seed gives the same clips."),
            ],
            outputs=[DATASET.Output(display_name="dataset")],
        )

    @classmethod
    def execute(cls, folder, clip_frames, width, height, frame_stride, seed) -> io.NodeOutput:
        dataset = VideoClipDataset(resolve_folder(folder), clip_frames, (height, width), frame_stride, seed)
        return io.NodeOutput(dataset)


class LiteVSRDegradation(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LiteVSRDegradation",
            display_name="Video Degradation (LiteVSR)",
            category="LiteVSR/training",
            description="How LR training clips are synthesised from HR clips: the RealBasicVSR/Real-ESRGAN "
                        "second-order pipeline (blur kernels, resize, Gaussian/Poisson noise, JPEG, then a real "
                        "video codec through PyAV), parameters held over each clip's frames. Connect frames to "
                        "preview one degradation.",
            inputs=[
                io.Combo.Input("preset", options=list(PRESETS), default="standard",
                               tooltip="light: mild blur/noise, rare codec. standard: Real-ESRGAN ranges with "
                                       "libx264/mpeg4 at 10-100 kbit per frame. heavy: strong blur, noise, "
                                       "low JPEG quality and bitrates."),
                io.Int.Input("scale", default=4, min=1, max=8,
                             tooltip="LR = HR / scale; the adapter learns this upscale factor."),
                io.String.Input("overrides", default="", multiline=True,
                                tooltip="Optional JSON replacing any range of the preset, per part: "
                                        '{"stage1": {"blur_sigma": [0.2, 2.0], "noise_sigma": [1, 20]}, '
                                        '"final": {"bitrate": [20000, 200000], "codec_prob": 0.5}}. '
                                        "stage1/stage2 fields: blur_prob, kernel_probs, kernel_sizes, "
                                        "blur_sigma, beta_gaussian, beta_plateau, resize_probs, resize_scale, "
                                        "resize_modes, noise_prob, gaussian_noise_prob, noise_sigma, "
                                        "poisson_scale, gray_noise_prob, jpeg_prob, jpeg_quality, codec_prob, "
                                        "codecs, bitrate. final: sinc_prob, sinc_omega, kernel_sizes, "
                                        "resize_modes, jpeg_prob, jpeg_quality, codec_prob, codecs, bitrate."),
                io.Image.Input("preview_frames", optional=True,
                               tooltip="Optional HR frames to degrade once with `preview_seed`, to see the result."),
                io.Int.Input("preview_seed", default=0, min=0, max=0xFFFFFFFFFFFF, optional=True,
                             tooltip="Which random degradation the preview shows."),
            ],
            outputs=[DEGRADATION.Output(display_name="degradation"),
                     io.Image.Output(display_name="preview", tooltip="The degraded preview frames (LR size).")],
        )

    @classmethod
    def execute(cls, preset, scale, overrides, preview_frames=None, preview_seed=0) -> io.NodeOutput:
        try:
            parsed = json.loads(overrides) if overrides.strip() else {}
        except json.JSONDecodeError as error:
            raise ValueError(f"Video Degradation (LiteVSR): overrides are not valid JSON ({error})") from None
        config = with_overrides(preset, parsed)
        preview = None
        if preview_frames is not None:
            preview, _ = degrade_clip(preview_frames[..., :3], scale, config, preview_seed)
        return io.NodeOutput({"config": config, "scale": scale}, preview)


class _ProgressHooks(Hooks):
    """Progress bar, the pack's status line (step, ETA, loss: js/litevsr.js), the validation loss as progress text,
    and a preview (LR | output | HR, middle frame) at each validation. The step loss is not also sent as progress
    text: the editor would show it twice."""

    def __init__(self, config, node_id, model, vae, summary=None):
        self.progress = comfy.utils.ProgressBar(config.steps)
        self.node_id, self.model, self.vae, self.config = node_id, model, vae, config
        self.summary = summary or {}  # the run's settings, for the front end's status line
        self.eta = Eta()  # from the first step of this run (resumed steps and the first validation excluded)
        self.validation_loss = None

    def _text(self, message):
        if self.node_id is None:  # not run by a server (direct calls in tests and tools)
            return
        from server import PromptServer

        if PromptServer.instance is not None:
            PromptServer.instance.send_progress_text(message, self.node_id)

    def on_step(self, step, total, loss):
        self.progress.update_absolute(step, total)
        send_progress(self.node_id, "step", step, total, self.eta(step, total), self.summary, loss=float(loss),
                      validation_loss=self.validation_loss)

    def on_validation(self, step, loss, denoise, samples):
        self._text(f"step {step}  validation loss {loss:.4f}")
        self.validation_loss = float(loss)
        sample = samples[0]
        device = self.model.load_device
        with torch.no_grad():
            lr, hr = sample.lr_latent.to(device), sample.hr_latent.to(device)
            output = sample_vsr(denoise, lr, sample.noise.to(device),
                                flow_sigmas(1, self.config.shift, self.config.first_sigma), self.config.start)
            decode = self.model.model.process_latent_out
            rows = [self.vae.decode(decode(z.float().cpu()))[0] for z in (lr, output, hr)]
        middle = rows[0].shape[0] // 2
        strip = torch.cat([frames[middle] for frames in rows], dim=1).clamp(0, 1)
        image = Image.fromarray((strip.numpy() * 255).round().astype(np.uint8))
        self.progress.update_absolute(self.progress.current, None, ("JPEG", image, 1024))


def timestep_inputs(sampling_tooltip, shift_tooltip):
    """How training noise levels are drawn (timestep_sampling, shift), with the node's words for what they do."""
    return [io.Combo.Input("timestep_sampling", options=list(TIMESTEP_SAMPLING), default="shifted",
                           tooltip=sampling_tooltip),
            io.Float.Input("shift", default=5.0, min=1.0, max=20.0, step=0.1, tooltip=shift_tooltip)]


def training_inputs(start, objective):
    """The inputs of a training node (Train, Distil), in the order saved workflows hold their widgets: the frozen
    models and the data, `start` (what the adapter starts from), the optimizer's batch, `objective` (the loss's
    own settings), then the run's optimizer, precision, checkpoint and validation settings and the text context.
    A widget added later goes after all of these, optional with a default, so saved workflows keep their order and
    saved API prompts stay valid."""
    return [
        io.Model.Input("model", tooltip="The frozen Wan DiT (Load Diffusion Model)."),
        io.Vae.Input("vae", tooltip="The matching Wan VAE; it encodes HR and LR clips every step."),
        DATASET.Input("dataset", tooltip="Training clips from 'Video Dataset (LiteVSR)'."),
        DEGRADATION.Input("degradation", tooltip="From 'Video Degradation (LiteVSR)'."),
        *start,
        io.Int.Input("steps", default=1000, min=1, max=1_000_000, tooltip="Optimizer steps (total, "
                                                                           "including resumed ones)."),
        io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-7,
                       tooltip="AdamW learning rate (1e-4 for real backbones; tiny test models take 1e-3)."),
        io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Clips per forward pass."),
        io.Int.Input("grad_accumulation", default=1, min=1, max=256,
                     tooltip="Forward passes per optimizer step (effective batch = batch_size x this)."),
        *objective,
        io.Float.Input("weight_decay", default=0.01, min=0.0, max=1.0, step=0.001,
                       tooltip="AdamW decoupled weight decay."),
        io.Float.Input("grad_clip", default=1.0, min=0.0, max=100.0, step=0.1,
                       tooltip="Max gradient norm; 0 turns clipping off."),
        io.Boolean.Input("gradient_checkpointing", default=True,
                         tooltip="Recompute the frozen blocks in backward instead of storing their "
                                 "activations: much less memory, about 30% slower."),
        io.Combo.Input("precision", options=list(PRECISIONS), default="auto",
                       tooltip="Autocast on GPU (auto: bf16 where supported, else fp16 with loss "
                               "scaling); the CPU always trains in fp32."),
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFF, control_after_generate=False,
                     tooltip="Seeds noise, noise levels, degradations and new weights (fixed: a resumed run "
                             "must see the same data stream)."),
        io.String.Input("run_name", default="litevsr_run",
                        tooltip="Checkpoint folder under output/litevsr_training/."),
        io.Int.Input("checkpoint_every", default=250, min=0, max=1_000_000,
                     tooltip="Save a checkpoint every N steps (and at the end); 0: only at the end."),
        io.Boolean.Input("resume", default=False,
                         tooltip="Continue from the newest checkpoint of run_name (adapter, optimizer "
                                 "state and step); the result equals an uninterrupted run."),
        io.Int.Input("validation_every", default=100, min=0, max=1_000_000,
                     tooltip="Held-out validation loss and a preview (LR | output | HR) every N steps; "
                             "also before and after training."),
        DATASET.Input("validation_dataset", optional=True,
                      tooltip="Held-out clips; without it validation clips come from the training "
                              "folder (a separate random stream)."),
        *context_inputs("the text encoder and the context of the file the adapter starts from",
                        " The context trained with is stored in the trained adapter's file."),
    ]


def run_training(node_id, model, vae, dataset, degradation, initial, run_name, checkpoint_every, resume,
                 validation_every, gradient_checkpointing, precision, validation_dataset=None, conditioning=None,
                 text_encoder=None, objective=velocity_loss, run_metadata=None, **config):
    """(TrainConfig, RunResult) of a training node's run with the pack's progress hooks: `initial` = (adapter module,
    its stored text context or None), the run's context chosen by adapters.text_context, `config` the TrainConfig
    fields the node sets, checkpoints in output/litevsr_training/<run_name>/."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", run_name):
        raise ValueError(f"run_name {run_name!r}: use letters, digits, '_', '-' and '.' (it names a folder)")
    config = TrainConfig(**config)
    adapter, stored = initial
    context = text_context(backbone_signature(model), conditioning, text_encoder, stored)
    settings = RunSettings(
        checkpoint_dir=os.path.join(folder_paths.get_output_directory(), TRAINING_OUTPUT, run_name),
        checkpoint_every=checkpoint_every, resume=resume, validation_every=validation_every,
        gradient_checkpointing=gradient_checkpointing, precision=precision,
        run_metadata={"config": config.to_dict(), "scale": degradation["scale"], **(run_metadata or {})})
    summary = {"batch_size": config.batch_size, "grad_accumulation": config.grad_accumulation,
               "learning_rate": config.learning_rate, "clip_frames": getattr(dataset, "clip_frames", None),
               "crop": [getattr(dataset, "crop_width", None), getattr(dataset, "crop_height", None)],
               "scale": degradation["scale"], "precision": precision, "run_name": run_name}
    hooks = _ProgressHooks(config, node_id, model, vae, summary)
    result = train_adapter(model, vae, dataset, degradation["config"], degradation["scale"], config, adapter,
                           context, settings, validation_dataset, hooks=hooks, objective=objective)
    return config, result


def trained_adapter(config, result, metadata=None):
    """The ADAPTER socket's value (for Save Adapter): the trained module, its context, and the file's metadata
    (steps and training settings, plus `metadata`)."""
    return {"adapter": result.adapter, "context": result.context,
            "metadata": {"train_steps": str(config.steps), "train_config": json.dumps(config.to_dict()),
                         **(metadata or {})}}


def loss_map(values):
    """A LOSS_MAP (what core 'Plot Loss Graph' reads)."""
    return {"loss": list(values)}


class LiteVSRTrainAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LiteVSRTrainAdapter",
            display_name="Train State-Aware Adapter (LiteVSR)",
            category="LiteVSR/training",
            description="Trains only the LiteVSR adapter on the frozen Wan DiT and VAE (both unchanged): the "
                        "clean-latent error weighted by LiteVSR's clamped sigma^-2 (the flow-matching velocity "
                        "loss), with the clean-estimate feedback unrolled along the sampler's own trajectory from "
                        "the chosen start, AdamW. Checkpoints (adapter + optimizer state) go to "
                        "output/litevsr_training/<run_name>/ and `resume` continues from the newest one exactly.",
            inputs=[
                *training_inputs(
                    adapter_choice_inputs("Start from a fresh zero-initialised adapter, or fine-tune a file from "
                                          "models/litevsr."),
                    [*timestep_inputs("shifted: uniform time pushed toward high noise by `shift` (as sampling); "
                                      "logit_normal: sigmoid of N(0, 1); uniform.",
                                      "Time shift for shifted sampling, the spacing of the unrolled steps (as the "
                                      "sampler's shift) and the validation preview."),
                     io.Int.Input("max_unrolls", default=3, min=1, max=8,
                                  tooltip="M_max of the adaptive unrolling schedule (s = 5): up to this many model "
                                          "calls per sample along the sampler's trajectory (one near the start, "
                                          "more near clean data), each feeding its clean estimate back; 1 = off."),
                     io.Combo.Input("loss_weighting", options=list(LOSS_WEIGHTINGS), default="litevsr",
                                    tooltip="Weight on the clean-latent error |x0_hat - z0|^2. litevsr: sigma^-2 "
                                            "clamped at max_loss_weight (= the flow-matching velocity MSE); none: "
                                            "1 (plain clean-latent MSE)."),
                     io.Float.Input("max_loss_weight", default=100.0, min=1.0, max=1e4, step=1.0,
                                    tooltip="Clamp of sigma^-2 (100 = no extra weight below sigma 0.1).")]),
                io.Combo.Input("start", options=list(START_MODES), default=TRAIN_DEFAULTS.start, optional=True,
                               tooltip="The sampler start this adapter is trained for. noise: from pure noise at "
                                       "sigma 1 (the paper). lr_latent: the LR latent itself as the state at "
                                       "start_sigma (InfVSR/DOVE style; sample with the same start and "
                                       "start_sigma)."),
                io.Float.Input("start_sigma", default=TRAIN_DEFAULTS.start_sigma, min=0.01, max=1.0, step=0.01,
                               optional=True, tooltip="Only for start = lr_latent: the noise level the LR latent "
                                                      "is taken as; training noise levels are drawn below it."),
                io.Int.Input("segments", default=TRAIN_DEFAULTS.segments, min=1, max=2, optional=True,
                             tooltip="2: each clip is cut into two consecutive segments and the second is trained as "
                                     "a long video's next chunk, given the first's finished frames (known frames) "
                                     "and its memory, as 'Upscale Video File' runs chunks; trains the adapter's "
                                     "memory of earlier chunks. Needs clips of at least segment_overlap + 2 latent "
                                     "frames; costs one more gradient-free pass over the first segment."),
                io.Int.Input("segment_overlap", default=TRAIN_DEFAULTS.segment_overlap, min=1, max=16,
                             optional=True, tooltip="With segments = 2: latent frames the two segments share (2 = "
                                                    "8 video frames, the streaming default overlap)."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The backbone with the trained adapter attached."),
                ADAPTER.Output(display_name="adapter", tooltip="For 'Save Adapter (LiteVSR)'."),
                LOSS_MAP.Output(display_name="loss_map", tooltip="Training loss per step, for 'Plot Loss Graph'."),
                LOSS_MAP.Output(display_name="validation_loss", tooltip="Held-out validation loss per validation."),
            ],
            hidden=[io.Hidden.unique_id],
            not_idempotent=True,
        )

    @classmethod
    def execute(cls, model, vae, dataset, degradation, adapter, injection, rank, **settings) -> io.NodeOutput:
        start = adapter_from_choice(backbone_signature(model), adapter, injection, rank, settings["seed"])
        config, result = run_training(getattr(cls.hidden, "unique_id", None), model, vae, dataset, degradation,
                                      start, run_metadata={"start_adapter": adapter}, **settings)
        return io.NodeOutput(result.model, trained_adapter(config, result), loss_map(result.losses),
                             loss_map(loss for _, loss in result.validation))


class LiteVSRSaveAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LiteVSRSaveAdapter",
            display_name="Save Adapter (LiteVSR)",
            category="LiteVSR/training",
            description="Saves a trained adapter into models/litevsr/ as safetensors with the metadata header "
                        "'Attach State-Aware Adapter' checks (backbone signature, format version, text context).",
            inputs=[
                ADAPTER.Input("adapter", tooltip="From 'Train State-Aware Adapter (LiteVSR)' or 'Distil One-Step "
                                                "Adapter (LiteVSR)'."),
                io.String.Input("filename_prefix", default="litevsr_adapter",
                                tooltip="File name under models/litevsr/; a counter is appended "
                                        "(litevsr_adapter_00001.safetensors), nothing is overwritten."),
            ],
            outputs=[io.String.Output(display_name="filename", tooltip="The saved file, relative to models/litevsr.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, adapter, filename_prefix) -> io.NodeOutput:
        folder = folder_paths.get_folder_paths(ADAPTER_FOLDER)[0]
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)*", filename_prefix):
            raise ValueError(f"filename_prefix {filename_prefix!r}: letters, digits, '_', '-', '.', and '/' for "
                             "subfolders of models/litevsr")
        target = os.path.join(folder, filename_prefix)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        counter = 1
        while os.path.exists(f"{target}_{counter:05d}.safetensors"):
            counter += 1
        path = save_adapter(f"{target}_{counter:05d}.safetensors", adapter["adapter"], adapter["context"],
                            adapter["metadata"])
        return io.NodeOutput(os.path.relpath(path, folder).replace(os.sep, "/"))
