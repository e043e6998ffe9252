"""`make distill` as real processes on the CPU (tiny stand-ins, Big Buck Bunny): OUT records that it is a one-step
student of which teacher, OUT.log.json has every step's generator and discriminator losses, a resumed run ends where
a straight run ends (student and both discriminators), and bad distillation settings are one line."""
import json
import sys

import pytest
from safetensors.torch import load_file

from comfyui_litevsr.nodes.core.adapter_file import load_adapter, read_header
from comfyui_litevsr.nodes.model_files import sha256_of

from test_train_headless import ENV, SETTINGS, TRAIN, data, log_of, run  # noqa: F401 (fixture)

PARTS = {"regression", "feature_generator", "pixel_generator", "feature_discriminator", "pixel_discriminator"}
DISTILL_ARGS = " ".join(SETTINGS + ["--feature-blocks", "1", "--pixel-crop", "2", "--lr", "1e-3"])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, data):
    """A teacher trained by `tools.train` on the same stand-ins."""
    out = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    run([sys.executable, *TRAIN, "--data", data, "--out", out, "--stand-ins", *SETTINGS, "--steps", 3, "--lr", "1e-2"])
    return out


def distill(data, teacher, out, steps, *extra):
    return run(["make", "-s", "distill", f"TEACHER={teacher}", f"DATA={data}", f"OUT={out}", f"STEPS={steps}",
                "TEACHER_STEPS=3", f"TRAIN_ARGS={DISTILL_ARGS}", *extra])


def test_make_distill_writes_a_one_step_student_of_its_teacher_and_every_loss(tmp_path, data, teacher):
    out = tmp_path / "student.safetensors"
    distill(data, teacher, out, 2)
    metadata = read_header(str(out))["__metadata__"]
    assert json.loads(metadata["distilled"]) == {"steps": 1, "teacher": "teacher.safetensors",
                                                 "teacher_sha256": sha256_of(teacher), "teacher_steps": 3}
    load_adapter(str(out))  # an ordinary adapter file
    log = log_of(out)
    assert [entry["step"] for entry in log["steps"]] == [1, 2]
    assert all(PARTS <= entry.keys() for entry in log["steps"])
    assert log["run"]["distill"]["teacher_steps"] == 3 and log["run"]["teacher"].endswith("teacher.safetensors")
    checkpoint = load_file(str(out) + ".checkpoints/step_00000002.state.safetensors")
    assert {name.split(".")[2] for name in checkpoint if name.startswith("objective.discriminator.")} == {
        "feature", "pixel"}


def test_bad_distillation_settings_are_one_line(tmp_path, data, teacher):
    done = run([sys.executable, *TRAIN, "--data", data, "--out", tmp_path / "s.safetensors", "--stand-ins",
                "--steps", 2, "--teacher", teacher, "--teacher-steps", 1], check=False)
    assert done.returncode == 2 and "the teacher must sample in at least 2 steps" in done.stdout.splitlines()[-1]
    done = run([sys.executable, *TRAIN, "--data", data, "--out", tmp_path / "s.safetensors", "--stand-ins",
                "--steps", 2, "--teacher", teacher, "--init-adapter", teacher], check=False)
    assert done.returncode == 2 and "leave out --init-adapter" in done.stdout.splitlines()[-1]
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_make_distill_resumes_where_a_straight_run_ends(tmp_path, data, teacher):
    resumed, straight = tmp_path / "resumed.safetensors", tmp_path / "straight.safetensors"
    distill(data, teacher, resumed, 2)
    output = distill(data, teacher, resumed, 4, "RESUME=1").stdout
    assert "from checkpoint step 2" in output
    distill(data, teacher, straight, 4)
    a, b = load_file(str(resumed)), load_file(str(straight))
    states = [load_file(f"{path}.checkpoints/step_00000004.state.safetensors") for path in (resumed, straight)]
    assert a.keys() == b.keys() and states[0].keys() == states[1].keys()
    adapter_diff = max(float((a[name] - b[name]).abs().max()) for name in a)
    state_diff = max(float((states[0][name] - states[1][name]).abs().max()) for name in states[0])
    steps = [log_of(path)["steps"] for path in (resumed, straight)]
    part_diff = max(abs(x[name] - y[name]) for x, y in zip(*steps, strict=True) for name in PARTS | {"loss"})
    print(f"\n[distill resume] 2 + 2 vs 4 straight: adapter {adapter_diff:.3g}, discriminators and optimizers "
          f"{state_diff:.3g}, step losses {part_diff:.3g}")
    assert adapter_diff <= 1e-6 and state_diff <= 1e-6 and part_diff <= 1e-6


@pytest.mark.slow
def test_two_processes_distil_what_one_process_distils(tmp_path, data, teacher):
    """NPROC=2 with batch 1 per process vs one process with batch 2: the same global batch, so the same step losses
    (generator and both discriminators) up to the rounding of a batch of 2 vs two batches of 1 and the all-reduce."""
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    distill(data, teacher, one, 3, f"TRAIN_ARGS={DISTILL_ARGS} --batch-size 2")
    shared = distill(data, teacher, two, 3, "NPROC=2", f"TRAIN_ARGS={DISTILL_ARGS} --batch-size 1").stdout
    assert "[train rank 1/2] models loaded" in shared
    steps = [log_of(path)["steps"] for path in (one, two)]
    worst = max(abs(x[name] - y[name]) / max(abs(x[name]), 1e-3) for x, y in zip(*steps, strict=True)
                for name in PARTS | {"loss"})
    print(f"\n[distill ddp] 2 processes x batch 1 vs 1 x batch 2, 3 steps: step losses max rel diff {worst:.3g}")
    assert (log_of(one)["processes"], log_of(two)["processes"]) == (1, 2)
    assert worst < 1e-4
