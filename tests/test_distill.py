"""One-step distillation (core/distill.py, nodes/distillation.py) on the frozen tiny Wan loaded by ComfyUI's own
loaders, with real bigbuckbunny clips: the heads and losses, zero adversarial weight is the plain trainer fed the
teacher's targets, resume is exact for the student and both discriminators, the backbone is untouched and the feature
discriminator trains only its head, and (slow) a student distilled from a trained teacher beats the teacher run at
one step on held-out clips."""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from comfyui_litevsr.nodes.backbone import attach_adapter, backbone_signature, make_denoiser
from comfyui_litevsr.nodes.core.checkpoint import load_checkpoint
from comfyui_litevsr.nodes.core.distill import (DistillConfig, Distillation, DualHead, discriminator_loss,
                                                 generator_loss, latent_mse, new_discriminators, one_step, r1_penalty,
                                                 step_calls)
from comfyui_litevsr.nodes.core.training import AdapterTrainer, TrainConfig, TrainingSample
from comfyui_litevsr.nodes.distillation import DistillObjective, pixel_decoder
from comfyui_litevsr.nodes.training_mode import comfy_training_mode
from comfyui_litevsr.nodes.training_run import RunSettings, train_adapter

from test_training import SCALE, clip_folders, datasets, fresh, models, tensor_digest  # noqa: F401 (fixtures)
from tools import tiny_models

TEACHER_STEPS = 4
ONE_BLOCK = DistillConfig(teacher_steps=TEACHER_STEPS, feature_blocks=1)  # the tiny DiT has 2 blocks


def test_dual_head_splits_its_channels_and_judges_time_on_frame_differences():
    torch.manual_seed(0)
    head = DualHead(8, 16, 0.75)
    assert head.detail_channels == 12  # AdcVSR's 75/25 split of the 16 channels
    video = torch.randn(2, 8, 3, 4, 4)
    detail, temporal = head(video)
    assert detail.shape == (2, 1, 3, 4, 4) and temporal.shape == (2, 1, 2, 4, 4)
    # a still video has no frame differences: its temporal logits do not depend on what it shows
    still_a, still_b = (torch.randn(1, 8, 1, 4, 4).expand(1, 8, 3, 4, 4) for _ in range(2))
    assert torch.equal(head(still_a)[1], head(still_b)[1])
    assert not torch.equal(head(still_a)[0], head(still_b)[0])
    assert head(video[:, :, :1])[1] is None  # one frame: nothing to be consistent with


def test_adversarial_losses_and_r1():
    real, fake = (torch.full((2, 1, 2, 3, 3), 2.0), None), (torch.full((2, 1, 2, 3, 3), -2.0), None)
    assert discriminator_loss(real, fake, "hinge").tolist() == [0, 0]  # beyond the margins: nothing to learn
    assert discriminator_loss(fake, real, "hinge").tolist() == [6, 6]  # 1 + 2 and 1 + 2
    assert generator_loss(fake, "hinge").tolist() == [2, 2]
    assert generator_loss(fake, "non_saturating").tolist() == pytest.approx([F.softplus(torch.tensor(2.0)).item()] * 2)
    inputs = torch.randn(2, 3, 1, 2, 2, requires_grad=True)
    weight = torch.randn(3)
    logits = ((inputs * weight.reshape(1, 3, 1, 1, 1)).sum(dim=1, keepdim=True), None)
    expected = weight.pow(2).sum() * 4  # d(sum)/d input = the weight at each of the 4 positions
    assert r1_penalty(logits, inputs).tolist() == pytest.approx([float(expected)] * 2, rel=1e-6)


def perturbed_teacher(model, seed=1):
    """A teacher that steers the DiT: a fresh adapter with random (not zero) injections."""
    return tiny_models.steering_adapter(backbone_signature(model), seed)


class RandomLatents:
    """Pairs of latents shaped like the tiny DiT's, a function of the sample index."""

    def batch(self, indices):
        generators = [torch.Generator().manual_seed(index) for index in indices]
        hr, lr, noise = (torch.cat([torch.randn(1, 16, 2, 8, 8, generator=g) for g in generators]) for _ in range(3))
        return TrainingSample(hr, lr, noise, torch.cat([torch.rand(1, generator=g) for g in generators]))


class TeacherTargets:
    """The plain trainer's data with the HR latent replaced by the teacher's N-step output."""

    def __init__(self, pairs, teacher):
        self.pairs, self.teacher = pairs, teacher

    def batch(self, indices):
        batch = self.pairs.batch(indices)
        return replace(batch, hr_latent=self.teacher.teacher_output(batch.lr_latent, batch.noise))


def test_zero_adversarial_weight_is_the_plain_trainer_fed_the_teachers_targets(models):
    model, _ = models
    context = tiny_models.zero_text_context()
    distill = DistillConfig(teacher_steps=TEACHER_STEPS, feature_weight=0.0, pixel_weight=0.0)
    teacher = perturbed_teacher(model)
    config = TrainConfig(steps=3, learning_rate=1e-3, batch_size=2, grad_accumulation=2)

    def train(objective, pairs_for):
        student = perturbed_teacher(model)  # initialised from the teacher
        denoise = make_denoiser(attach_adapter(model, student, context))
        distillation = Distillation(make_denoiser(attach_adapter(model, teacher, context)), distill,
                                    new_discriminators(distill, 0))
        trainer = AdapterTrainer(student, denoise, pairs_for(distillation), config, objective=objective(distillation))
        return [trainer.step() for _ in range(config.steps)], student.state_dict()

    def plain_regression(denoise, hr_latent, lr_latent, noise, sigma, config):
        return latent_mse(one_step(denoise, lr_latent, noise, distill.teacher_shift), hr_latent)

    with torch.inference_mode(False), torch.enable_grad(), comfy_training_mode():  # as train_adapter runs
        distilled_losses, distilled = train(lambda d: d, lambda d: RandomLatents())
        plain_losses, plain = train(lambda d: plain_regression, lambda d: TeacherTargets(RandomLatents(), d))
    assert distilled_losses == plain_losses  # bit for bit, every step
    assert all(torch.equal(distilled[name], plain[name]) for name in plain)
    assert not torch.equal(distilled["injections.0.up.weight"], perturbed_teacher(model).state_dict()
                           ["injections.0.up.weight"])  # and the student did move


def test_step_calls_are_what_a_step_calls():
    """The cost estimate's call counts (step_calls) against the calls one optimizer step really makes."""
    calls = {"teacher": 0, "student": 0, "trunk": 0, "decode": 0}

    def counted(name, function):
        def call(*args):
            calls[name] += 1
            return function(*args)
        return call

    torch.manual_seed(0)
    adapter = torch.nn.Conv3d(32, 16, 1)
    student = counted("student", lambda x, sigma, lr, estimate: adapter(torch.cat([x, lr], dim=1)))
    teacher = counted("teacher", lambda x, sigma, lr, estimate: 0.5 * x + lr)
    trunk = counted("trunk", lambda latent, sigma: latent * 1.0)
    decode = counted("decode", lambda latent: latent[:, :3].tanh())
    config = DistillConfig(teacher_steps=3, head_width=8, pixel_width=4)
    objective = Distillation(teacher, config, new_discriminators(config, 16), trunk, decode)
    AdapterTrainer(adapter, student, RandomLatents(), TrainConfig(steps=1), objective=objective).step()
    expected = step_calls(config)
    assert calls == {**expected, "decode": 2}  # the pixel discriminator decodes the fake once, and the real
    assert step_calls(replace(config, feature_weight=0.0))["trunk"] == 0


def distil(models, clip_folders, steps, settings=None, distill=ONE_BLOCK, teacher=None, config=None):
    """As the Distil node runs it: under inference mode, with the stock-loaded MODEL and VAE."""
    model, vae = models
    teacher = teacher or perturbed_teacher(model)
    train_set, val_set = datasets(clip_folders)
    config = config or TrainConfig(steps=steps, learning_rate=1e-3, seed=2)
    with torch.inference_mode():
        return train_adapter(model, vae, train_set, "light", SCALE, config, teacher, None, settings or RunSettings(),
                             val_set, objective=DistillObjective(teacher, None, distill))


def test_distillation_resume_is_exact_for_the_student_and_both_discriminators(models, clip_folders, tmp_path):
    straight = distil(models, clip_folders, 4, RunSettings(checkpoint_dir=str(tmp_path / "straight")))
    distil(models, clip_folders, 2, RunSettings(checkpoint_dir=str(tmp_path / "resumed"), checkpoint_every=1),
           config=TrainConfig(steps=2, learning_rate=1e-3, seed=2))
    resumed = distil(models, clip_folders, 4, RunSettings(checkpoint_dir=str(tmp_path / "resumed"), resume=True))
    assert resumed.resumed_from == 2
    a, b = (load_checkpoint(tmp_path / run, 4)[2] for run in ("straight", "resumed"))
    discriminators = [name for name in a if name.startswith("objective.discriminator.")]
    assert {name.split(".")[2] for name in discriminators} == {"feature", "pixel"}
    assert a.keys() == b.keys() and any(name.startswith("objective.discriminator_optimizer.") for name in a)
    worst = max(float((a[name] - b[name]).abs().max()) for name in a)
    worst_adapter = max(float((x - y).abs().max()) for x, y in zip(straight.adapter.state_dict().values(),
                                                                   resumed.adapter.state_dict().values()))
    print(f"\n[distill resume] max |straight - resumed|: adapter {worst_adapter:.3g}, checkpoint state {worst:.3g}")
    assert worst <= 1e-6 and worst_adapter <= 1e-6
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-6)
    assert resumed.loss_parts.keys() == straight.loss_parts.keys() == {
        "regression", "feature_generator", "pixel_generator", "feature_discriminator", "pixel_discriminator"}
    for name, values in straight.loss_parts.items():
        assert resumed.loss_parts[name] == pytest.approx(values, rel=1e-6, abs=1e-7)


def test_backbone_untouched_and_the_feature_discriminator_trains_only_its_head(models, clip_folders, tmp_path):
    model, vae = models
    before = (tensor_digest(model.model), tensor_digest(vae.first_stage_model))
    result = distil(models, clip_folders, 2, RunSettings(checkpoint_dir=str(tmp_path / "run")))
    assert (tensor_digest(model.model), tensor_digest(vae.first_stage_model)) == before
    state = load_checkpoint(tmp_path / "run", 2)[2]
    feature = {name.split(".", 3)[3]: value for name, value in state.items()
               if name.startswith("objective.discriminator.feature.")}
    head = DualHead(backbone_signature(model).dim, ONE_BLOCK.head_width, ONE_BLOCK.detail_share)
    assert feature.keys() == head.state_dict().keys()  # the feature discriminator's trained weights: its head only
    fresh_head = new_discriminators(ONE_BLOCK, backbone_signature(model).dim, seed=2)["feature"].state_dict()
    assert any(not torch.equal(feature[name], fresh_head[name]) for name in feature)  # and it did train
    assert all(len(values) == 2 for values in result.loss_parts.values())


def test_pixel_decoder_trains_through_a_model_loaded_by_a_node(tiny_dit_path, tiny_vae_path):
    """ComfyUI runs the loader nodes under inference mode, so that MODEL's latent format holds inference tensors
    (Wan's latent mean and std), which autograd refuses to save: the pixel discriminator's decode still backpropagates
    to the latent, and its frames equal the stock map into the VAE's space followed by the VAE's decode."""
    import comfy.sd
    import comfy.utils

    with torch.inference_mode():
        model = comfy.sd.load_diffusion_model(str(tiny_dit_path))
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(tiny_vae_path)))
    assert model.model.latent_format.latents_std.is_inference()
    latent = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    frames = pixel_decoder(vae, model, torch.device("cpu"))(latent)
    frames.square().sum().backward()
    assert latent.grad.abs().sum() > 0
    with torch.no_grad():
        stock = vae.first_stage_model.decode(model.model.process_latent_out(latent.detach()))
    assert torch.equal(frames.detach(), stock)


@pytest.fixture(scope="module")
def trained_teacher(models, clip_folders):
    """A real teacher: 150 steps of ordinary adapter training on the tiny Wan."""
    model, vae = models
    train_set, val_set = datasets(clip_folders)
    with torch.inference_mode():
        result = train_adapter(model, vae, train_set, "light", SCALE, TrainConfig(steps=150, learning_rate=1e-3,
                                                                                    seed=0),
                               fresh(model), None, RunSettings(), val_set)
    return result.adapter


@pytest.mark.slow
def test_distilled_student_beats_the_teacher_at_one_step(models, clip_folders, trained_teacher):
    """200 steps with both discriminators on: held-out latent MSE of the one-step student to the teacher's 4-step
    output falls below the teacher's own one-step output's (validation at step 0 is the student before training,
    which is the teacher), and every loss stays finite."""
    result = distil(models, clip_folders, 200, RunSettings(validation_clips=2), teacher=trained_teacher,
                    config=TrainConfig(steps=200, learning_rate=1e-3, seed=0))
    (_, teacher_one_step), (_, student) = result.validation[0], result.validation[-1]
    print(f"\n[distill] held-out latent MSE to the {TEACHER_STEPS}-step teacher: teacher at 1 step "
          f"{teacher_one_step:.5f}, distilled student {student:.5f} ({student / teacher_one_step:.2f}x); last "
          + ", ".join(f"{name} {values[-1]:.4f}" for name, values in sorted(result.loss_parts.items())))
    assert student < 0.7 * teacher_one_step
    assert all(torch.isfinite(torch.tensor(values)).all() for values in result.loss_parts.values())
    assert all(len(values) == 200 for values in result.loss_parts.values())
    assert torch.isfinite(torch.tensor(result.losses)).all()
