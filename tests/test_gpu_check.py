"""`make gpu-check` (tools/gpu_check.sh) on a machine without CUDA: one "no CUDA, skipped" line, exit 0, nothing
written. The check itself (Dynamic VRAM, which `--cpu` turns off) needs a GPU; run the script there."""
import glob
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import COMFY, REPO

SKIP_LINE = "no CUDA, skipped"
pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="CUDA is available: run `make gpu-check` (the real check) instead")


def skip_lines(result):
    return [line for line in (result.stdout + result.stderr).splitlines() if SKIP_LINE in line]


def test_gpu_check_skips_without_cuda(tmp_path):
    if glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/dxg") or shutil.which("nvidia-smi"):
        pytest.skip("an NVIDIA device is visible but torch cannot use it: the script would build the ComfyUI 0.33.0 "
                    "environment before torch says so")
    # A matrix run points COMFYUI_PATH at its own ComfyUI; the script's default (0.33.0) is what is tested here.
    env = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_PATH", "COMFYUI_SNAPSHOT")}
    work = tmp_path / "work"
    r = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), "--work-dir", str(work)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    assert len(skip_lines(r)) == 1 and skip_lines(r)[0].startswith("[gpu_check] "), r.stdout + r.stderr
    assert not work.exists()


def test_gpu_check_helper_skips_where_torch_has_no_cuda(tmp_path):
    """Past the device check (a GPU visible to the system, unusable for torch): the helper, in this test
    environment, says why torch has no CUDA before it builds any model or starts a server."""
    work = tmp_path / "work"
    env = dict(os.environ, COMFYUI_PATH=str(COMFY), PYTHONDONTWRITEBYTECODE="1")
    r = subprocess.run([sys.executable, "-m", "tools.gpu_check", "--work-dir", str(work)], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    (line,) = skip_lines(r)
    assert "torch.cuda.is_available() is False" in line, line
    assert r.stdout.strip() == line, r.stdout
    assert not work.exists()
