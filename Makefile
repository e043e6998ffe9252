# ComfyUI-LiteVSR developer commands. The environment (venv with pinned torch + ComfyUI 0.3.75) is built once
# by tools/bootstrap_env.sh into ~/.cache/comfyui-litevsr and linked here as .venv and .comfyui.
#
#   make test                      the whole test suite (unit, in-process ComfyUI, real headless server); the 15
#                                  slowest tests are listed at the end
#   make test-quick                the same without the tests marked slow (training to convergence, torchrun, browser)
#   make test-matrix [MATRIX_COMFYUI="wheel path/to/comfyui-x.tar.gz ..."] [MATRIX_PARTIAL="0.8.0 ..."]
#                                  the suite against each ComfyUI (default: 0.3.75 from the wheel plus every snapshot in
#                                  ../shared/comfyui/), each in its own cached environment, then one table of
#                                  version x passed/failed/skipped (tools/test_matrix.py); versions in MATRIX_PARTIAL
#                                  run the compatibility subset (models, end to end, streaming, training)
#   make test-browser              only the browser test: the examples in ComfyUI's front end in headless Chromium
#                                  (needs chromium + chromedriver: apt-get install chromium chromium-driver; skipped
#                                  with the reason otherwise); LITEVSR_UPDATE_SCREENSHOTS=1 rewrites docs/images/*.png
#   make demo [INPUT=clip.mp4] [OUTPUT=output/demo.mp4] [SCALE=4] [STEPS=1] [ADAPTER=...] [MODELS_DIR=...] [STREAM=1]
#             [MODEL=infvsr] [SAMPLE=33x320x180]  STREAM=1: the long-video example (streaming node, file to file)
#                                  instead; MODEL=infvsr: the InfVSR example (the streaming node on InfVSR's causal
#                                  stream); SAMPLE: frames x width x height of the default input cut from bigbuckbunny
#   make serve [PORT=8188] [MODELS_DIR=...]   the same ComfyUI with the pack, for a browser
#   make upscale INPUT=clip.mp4 [OUTPUT=output/upscaled.mp4] [NPROC=2] [DIT=... VAE=...] [DECODER=...] [ADAPTER=file]
#                [SCALE=4] [STEPS=1] [CHUNK_FRAMES=0] [OVERLAP_FRAMES=8] [SEGMENT_CHUNKS=...] [UPSCALE_ARGS=...]
#                                  file to file in this process (tools/upscale.py, no server); NPROC > 1 shares
#                                  the chunks between torchrun processes (same output as one process run with the
#                                  same SEGMENT_CHUNKS; default 0 for one process, 4 for several); DECODER: a faster
#                                  decoder of the same latents (lighttaew2_1, taew2_1, lightvaew2_1 ... file)
#   make train DATA=videos/ OUT=adapter.safetensors STEPS=n [RESUME=1] [NPROC=1] [DIT=... VAE=...] [TRAIN_ARGS=...]
#                                  train an adapter on the frozen DiT (tools/train.py, no server): checkpoints in
#                                  OUT.checkpoints/, RESUME=1 continues from the newest, losses in OUT.log.json;
#                                  NPROC > 1: data-parallel torchrun processes, global batch = --batch-size (per
#                                  process, TRAIN_ARGS) x --grad-accumulation x NPROC
#   make distill TEACHER=adapter.safetensors DATA=videos/ OUT=student.safetensors STEPS=n [TEACHER_STEPS=4] [RESUME=1]
#                [NPROC=1] [DIT=... VAE=...] [TRAIN_ARGS=...]
#                                  distil a one-step student from the teacher adapter run at TEACHER_STEPS
#                                  (tools/train.py --teacher): as `make train`, plus both discriminators in the
#                                  checkpoints, the teacher in OUT's metadata and the loss parts in OUT.log.json;
#                                  TRAIN_ARGS takes the distillation options (--feature-weight, ...: --help)
#   make bench [FULL=1] [MODELS_DIR=...] [BENCH_ARGS=...]   benchmarks -> bench/results/latest.json + PNG plots,
#                                  README's performance table rewritten from it (bench/run.py): quick by default;
#                                  the gpu section needs CUDA and MODELS_DIR
#   make gpu-check [GPU_CHECK_ARGS=...]   on one CUDA GPU (~10 min): examples, training, streaming under Dynamic VRAM
#   make eval [MODELS_DIR=...] [CLIPS=a.mp4,videos/] [EVAL_ARGS=...]   quality at 4x: PSNR, SSIM, warping error,
#                                  BRISQUE, NIQE of LiteVSR against bicubic, SPAN x4 and Real-ESRGAN x4plus (ncnn)
#                                  on bicubic-downscaled real clips (default bigbuckbunny), after a sanity row that
#                                  must reproduce bicubic 30.41 / SPAN 32.35 dB -> bench/results/eval/ (bench/eval.py);
#                                  without MODELS_DIR the LiteVSR rows use stand-ins: a smoke test, not a quality figure
#   make models MODELS_DIR=... [DOWNLOAD=1] [ONLY=name,...]   which supported model files (weights/models.json) are
#                                  in MODELS_DIR, which are missing and where each goes (tools/models.py); DOWNLOAD=1
#                                  fetches the missing ones (default: Wan2.1 T2V 1.3B + its VAE; ONLY=ids, family
#                                  ids or all), resumable and SHA-256 verified before it gets its final name
#   make infvsr-convert IN=InfVSR.ckpt OUT=.../diffusion_models/InfVSR.safetensors   one of InfVSR's pickles (its DiT,
#                                  RAM's ram_swin_large_14m.pth, DAPE.pth) converted once to safetensors; RAM keeps
#                                  only its image encoder (tools/infvsr.py)
#
# Without MODELS_DIR (a folder holding diffusion_models/, vae/, litevsr/; infvsr/ for MODEL=infvsr), demo and serve
# use tiny random-weight stand-ins: the output only demonstrates the pipeline. So do `make upscale` and `make train`
# without DIT/VAE.

# LITEVSR_PYTHON: the matrix runs each version's tests (and the make targets they call) with that environment
PYTHON   := $(or $(LITEVSR_PYTHON),.venv/bin/python)
MATRIX_COMFYUI ?=
MATRIX_PARTIAL ?=
INPUT    ?=
OUTPUT   ?= output/demo.mp4
SCALE    ?= 4
STEPS    ?= 1
ADAPTER  ?= new (zero-init)
MODELS_DIR ?=
STREAM   ?=
MODEL    ?= litevsr
SAMPLE   ?=
PORT     ?= 8188
FULL     ?=
PYTEST_FLAGS ?= -q -p no:cacheprovider --timeout=600 -ra --durations=15
NPROC    ?= 1
DIT      ?=
VAE      ?=
DECODER  ?=
CHUNK_FRAMES ?= 0
OVERLAP_FRAMES ?= 8
SEGMENT_CHUNKS ?= $(if $(filter 1,$(NPROC)),0,4)
UPSCALE_ARGS ?=
DATA     ?=
OUT      ?=
IN       ?=
RESUME   ?=
TEACHER  ?=
TEACHER_STEPS ?= 4
TRAIN_ARGS ?=
BENCH_ARGS ?=
CLIPS    ?=
EVAL_ARGS ?=
DOWNLOAD ?=
ONLY     ?=
# `make upscale` writes output/upscaled.mp4 unless OUTPUT is given (OUTPUT's default belongs to `make demo`)
UPSCALE_OUTPUT = $(if $(filter command line environment,$(origin OUTPUT)),$(OUTPUT),output/upscaled.mp4)
TORCHRUN_LAUNCH = $(if $(filter 1,$(NPROC)),$(PYTHON),$(PYTHON) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC))
# STEPS defaults to 1 for sampling; `make train` takes only a STEPS that was given
TRAIN_STEPS = $(if $(filter command line environment,$(origin STEPS)),$(STEPS),)

.PHONY: env test test-quick test-matrix test-browser demo serve upscale train distill bench gpu-check eval models infvsr-convert \
	clean

env:
	@$(if $(LITEVSR_PYTHON),true,bash tools/bootstrap_env.sh)

test: env
	PYTHONDONTWRITEBYTECODE=1 $(PYTHON) -m pytest tests $(PYTEST_FLAGS)

# while developing: everything but the tests marked slow (make test, and CI, run them all)
test-quick: env
	PYTHONDONTWRITEBYTECODE=1 $(PYTHON) -m pytest tests $(PYTEST_FLAGS) -m "not slow"

test-matrix:
	PYTHONDONTWRITEBYTECODE=1 python3 -m tools.test_matrix $(foreach spec,$(MATRIX_COMFYUI),--comfyui "$(spec)") \
		$(foreach version,$(MATRIX_PARTIAL),--partial "$(version)")

test-browser: env
	PYTHONDONTWRITEBYTECODE=1 $(PYTHON) -m pytest tests/test_browser.py $(PYTEST_FLAGS)

# `exec` (demo, serve, upscale, train, eval): the tool takes the shell's place, so make, stopped by a signal, waits
# for the tool's clean-up (server stopped, temporary files deleted); a shell in between would die at once.
demo: env
	PYTHONDONTWRITEBYTECODE=1 exec $(PYTHON) -m tools.demo demo --input "$(INPUT)" --output "$(OUTPUT)" \
		--scale "$(SCALE)" --steps "$(STEPS)" --adapter "$(ADAPTER)" --models-dir "$(MODELS_DIR)" \
		--model "$(MODEL)" $(if $(filter-out 0,$(STREAM)),--stream) $(if $(SAMPLE),--sample "$(SAMPLE)")

serve: env
	PYTHONDONTWRITEBYTECODE=1 exec $(PYTHON) -m tools.demo serve --port "$(PORT)" --models-dir "$(MODELS_DIR)"

upscale: env
	@test -n "$(INPUT)" || { echo "make upscale needs INPUT=video-file" >&2; exit 2; }
	PYTHONDONTWRITEBYTECODE=1 exec $(TORCHRUN_LAUNCH) -m tools.upscale --input "$(INPUT)" --output "$(UPSCALE_OUTPUT)" \
		$(if $(DIT),--dit "$(DIT)" --vae "$(VAE)",--stand-ins) $(if $(findstring zero-init,$(ADAPTER)),,--adapter "$(ADAPTER)") \
		--scale "$(SCALE)" --steps "$(STEPS)" --chunk-frames "$(CHUNK_FRAMES)" --overlap-frames "$(OVERLAP_FRAMES)" \
		--segment-chunks "$(SEGMENT_CHUNKS)" $(if $(DECODER),--decoder "$(DECODER)") $(UPSCALE_ARGS)

TRAIN_RUN = PYTHONDONTWRITEBYTECODE=1 exec $(TORCHRUN_LAUNCH) -m tools.train --data "$(DATA)" --out "$(OUT)" \
	--steps "$(TRAIN_STEPS)" $(if $(DIT),--dit "$(DIT)" --vae "$(VAE)",--stand-ins) $(if $(filter-out 0,$(RESUME)),--resume)

train: env
	@test -n "$(DATA)" && test -n "$(OUT)" && test -n "$(TRAIN_STEPS)" || \
		{ echo "make train needs DATA=video-folder OUT=adapter.safetensors STEPS=n" >&2; exit 2; }
	$(TRAIN_RUN) $(TRAIN_ARGS)

distill: env
	@test -n "$(TEACHER)" && test -n "$(DATA)" && test -n "$(OUT)" && test -n "$(TRAIN_STEPS)" || \
		{ echo "make distill needs TEACHER=adapter.safetensors DATA=video-folder OUT=student.safetensors STEPS=n" >&2; exit 2; }
	$(TRAIN_RUN) --teacher "$(TEACHER)" --teacher-steps "$(TEACHER_STEPS)" $(TRAIN_ARGS)

bench: env
	PYTHONDONTWRITEBYTECODE=1 $(PYTHON) -m bench.run $(if $(filter-out 0,$(FULL)),--full) --models-dir "$(MODELS_DIR)" --readme $(BENCH_ARGS)

# no `env` prerequisite: the script builds (only where a GPU is visible) or reuses its own ComfyUI 0.33.0 environment
gpu-check:
	bash tools/gpu_check.sh $(GPU_CHECK_ARGS)

eval: env
	PYTHONDONTWRITEBYTECODE=1 exec $(PYTHON) -m bench.eval --models-dir "$(MODELS_DIR)" --clips "$(CLIPS)" $(EVAL_ARGS)

models: env
	@test -n "$(MODELS_DIR)" || { echo "make models needs MODELS_DIR=folder (diffusion_models/, vae/, text_encoders/, litevsr/ under it)" >&2; exit 2; }
	PYTHONDONTWRITEBYTECODE=1 $(PYTHON) -m tools.models --models-dir "$(MODELS_DIR)" \
		$(if $(filter-out 0,$(DOWNLOAD)),--download) $(if $(ONLY),--only "$(ONLY)")

infvsr-convert: env
	@test -n "$(IN)" && test -n "$(OUT)" || { echo "make infvsr-convert needs IN=file.ckpt/.pth OUT=file.safetensors" >&2; exit 2; }
	PYTHONDONTWRITEBYTECODE=1 $(PYTHON) -m tools.infvsr convert "$(IN)" "$(OUT)"

clean:
	rm -rf output .serve
