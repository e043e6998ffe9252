# ComfyUI-LiteVSR developer commands. The environment (venv with pinned torch + ComfyUI 0.3.75) is built once
# by tools/bootstrap_env.sh into ~/.cache/comfyui-litevsr and linked here as .venv and .comfyui.
#
#   make test                      the whole test suite (unit, in-process ComfyUI, real headless server)
#   make demo [INPUT=clip.mp4] [OUTPUT=output/demo.mp4] [SCALE=4] [STEPS=1] [ADAPTER=...] [MODELS_DIR=...]
#   make serve [PORT=8188] [MODELS_DIR=...]   the same ComfyUI with the pack, for a browser
#
# Without MODELS_DIR (a folder holding diffusion_models/, vae/, litevsr/), demo and serve use tiny
# random-weight Wan stand-ins: the output only demonstrates the pipeline.

PYTHON   := .venv/bin/python
INPUT    ?=
OUTPUT   ?= output/demo.mp4
SCALE    ?= 4
STEPS    ?= 1
ADAPTER  ?= new (zero-init)
MODELS_DIR ?=
PORT     ?= 8188
PYTEST_FLAGS ?= -q -p no:cacheprovider --timeout=600 -ra

.PHONY: env test demo serve clean

env:
	@bash tools/bootstrap_env.sh

test: env
	PYTHONDONTWRITEBYTECODE=1 $(PYTHON) -m pytest tests $(PYTEST_FLAGS)

demo: env
	PYTHONDONTWRITEBYTECODE=1 $(PYTHON) tools/demo.py demo --input "$(INPUT)" --output "$(OUTPUT)" \
		--scale "$(SCALE)" --steps "$(STEPS)" --adapter "$(ADAPTER)" --models-dir "$(MODELS_DIR)"

serve: env
	PYTHONDONTWRITEBYTECODE=1 $(PYTHON) tools/demo.py serve --port "$(PORT)" --models-dir "$(MODELS_DIR)"

clean:
	rm -rf output .serve
