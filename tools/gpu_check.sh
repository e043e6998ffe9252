#!/usr/bin/env bash
# `make gpu-check`: the pack under ComfyUI's Dynamic VRAM, on one CUDA GPU, in under 10 minutes (H200).
#
# ComfyUI >= 0.16 loads models on NVIDIA GPUs through Dynamic VRAM (ModelPatcherDynamic, comfy-aimdo: weights
# streamed lazily). `--cpu` turns it off and a CPU load device gets a plain ModelPatcher, so the CPU test suite
# cannot reach it. This builds (once) or reuses the ComfyUI 0.33.0 environment and runs tools/gpu_check.py in it:
# three headless servers with ComfyUI's default flags (Dynamic VRAM on), random weights at the real Wan2.1-1.3B
# geometry, small sizes to stay in time (160x96 input at scale 4 -> 640x384; 17-frame 256x256 training crops):
#   a. the upscale example on 33 frames of bigbuckbunny
#   b. the training example, 20 adapter steps
#   c. the long-video example (streaming node, file to file) on a 300-frame clip: exactly 300 frames out
# Each prints pass/FAIL, wall time, fps (steps/s for b) and the peak VRAM (device-wide, nvidia-smi; see its output).
# Exit status 1 if any step failed.
#
#   bash tools/gpu_check.sh [tools/gpu_check.py options, e.g. --stream-frames 150 --work-dir DIR]
#   COMFYUI_SNAPSHOT=comfyui-x.tar.gz | COMFYUI_PATH=ComfyUI-dir   another ComfyUI (default: the 0.33.0 snapshot
#                                                                   in ../shared/comfyui/ beside the checkout)
#
# Without CUDA it prints one "[gpu_check] no CUDA, skipped: <why>" line and exits 0. Where no NVIDIA device is
# visible at all (no /dev/nvidia<N>, no WSL /dev/dxg, no GPU in `nvidia-smi -L`) that happens before the environment
# is built, so a CPU-only machine never builds a 6 GB environment for it; otherwise torch in that environment
# decides. Models (about 3.3 GB) are written only after CUDA was found.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

allow_cpu=""
for arg in "$@"; do
  if [ "$arg" = "--allow-cpu" ]; then allow_cpu=1; fi
done

nvidia_visible() {
  ls /dev/nvidia[0-9]* >/dev/null 2>&1 && return 0
  [ -e /dev/dxg ] && return 0  # WSL2
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU ' && return 0
  return 1
}
if [ -z "$allow_cpu" ] && ! nvidia_visible; then
  echo "[gpu_check] no CUDA, skipped: no NVIDIA GPU visible on this machine" \
       "(no /dev/nvidia<N>, no GPU in nvidia-smi -L)"
  exit 0
fi

if [ -z "${COMFYUI_SNAPSHOT:-}" ] && [ -z "${COMFYUI_PATH:-}" ]; then
  COMFYUI_SNAPSHOT="$root/../shared/comfyui/comfyui-0.33.0.tar.gz"
fi
if [ -n "${COMFYUI_SNAPSHOT:-}" ] && [ ! -f "$COMFYUI_SNAPSHOT" ]; then
  echo "[gpu_check] no ComfyUI snapshot at $COMFYUI_SNAPSHOT: set COMFYUI_SNAPSHOT=comfyui-x.tar.gz" \
       "or COMFYUI_PATH=a ComfyUI checkout (>= 0.16 for Dynamic VRAM)" >&2
  exit 2
fi
if [ -n "${COMFYUI_SNAPSHOT:-}" ]; then export COMFYUI_SNAPSHOT; fi

# "<venv python> <ComfyUI dir>" on stdout; the build's progress goes to stderr.
env_line="$(LITEVSR_NO_LINK=1 bash "$root/tools/bootstrap_env.sh" | tail -n 1)"
python="${env_line%% *}"
comfy="${env_line#* }"
if [ ! -x "$python" ] || [ ! -f "$comfy/main.py" ]; then
  echo "[gpu_check] tools/bootstrap_env.sh printed '$env_line', not '<venv python> <ComfyUI dir>'" >&2
  exit 2
fi

cd "$root"
COMFYUI_PATH="$comfy" PYTHONDONTWRITEBYTECODE=1 exec "$python" -m tools.gpu_check "$@"
