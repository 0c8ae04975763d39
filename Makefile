# Two commands for a newcomer:  make demo   and   make test
# Everything is installed into .venv by `make setup` (both depend on it).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
TORCH_VERSION ?= 2.13.0
# Where the CPU build of torch lives when the configured package index does not have it.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
DEMO_DIR ?= demo
DEMO_SAMPLES ?= 48
DEMO_EPOCHS ?= 60
# The long video continues the first frame of a demo clip, with that clip's caption.
DEMO_LONG_REFERENCE ?= clip_000.mp4
DEMO_LONG_PROMPT ?= a white square moves down on a yellow background
# make demo-model: where it works, how much demo data, how long (see README, The demo model)
DEMO_MODEL_DIR ?= demo-model
DEMO_MODEL_SAMPLES ?= 96
DEMO_MODEL_EPOCHS ?= 272
# An NVIDIA GPU is present when nvidia-smi lists one.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)

# Tests and the demo never touch the network: models are made locally.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo demo-model test lint format bench gpu-check gpu-wheels clean help

help:
	@echo "make demo   set up .venv, make demo data and tiny models, run the pipeline as far as it goes"
	@echo "make test   set up .venv, lint and run the test suite"
	@echo "make demo-model  train the committed demo model again (configs/demo/model; about 45 minutes on 2 cores)"
	@echo "make bench  run the benchmarks in benchmarks/"
	@echo "make gpu-check  the one-call GPU check (benchmarks/gpu_check.py; ~5 min on an H100/H200)"
	@echo "make gpu-wheels  wheels of the packages a bare GPU machine lacks, into gpu-wheels/ (needs the index)"
	@echo "make setup  only create .venv and install the project (idempotent)"

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
ifeq ($(HAS_GPU),yes)
	@echo "NVIDIA GPU found: installing the CUDA build of torch $(TORCH_VERSION)"
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)"
else
	@echo "No NVIDIA GPU: installing the CPU build of torch $(TORCH_VERSION)"
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)+cpu" \
	  || $(BIN)/pip install --quiet "torch==$(TORCH_VERSION)+cpu" --extra-index-url $(TORCH_CPU_INDEX)
endif
	$(BIN)/pip install --quiet -e ".[dev]"
ifeq ($(HAS_GPU),yes)
	@# flash-attn compiles against the installed torch; it is optional (SDPA is the fallback).
	$(BIN)/pip install --quiet --no-build-isolation "flash-attn>=2.5" \
	  || echo "warning: flash-attn did not install; attention falls back to PyTorch SDPA"
endif
	@touch $(STAMP)
	@echo "setup done: $(VENV) ($$($(BIN)/python -c 'import torch; print("torch", torch.__version__)'))"

demo: setup
	$(BIN)/sora demo-data $(DEMO_DIR)/data --num $(DEMO_SAMPLES)
	$(BIN)/sora config configs/demo/train.py > $(DEMO_DIR)/train.resolved.py
	$(BIN)/sora config configs/demo/inference.py > $(DEMO_DIR)/inference.resolved.py
	$(BIN)/sora preprocess $(DEMO_DIR)/data/data.csv --config configs/demo/train.py --cache-dir $(DEMO_DIR)/cache
	$(BIN)/sora bucket-report $(DEMO_DIR)/cache --config configs/demo/train.py --plot $(DEMO_DIR)/buckets.png
	@# A fresh model for a few minutes: loss and eval loss falling, previews at each checkpoint.
	$(BIN)/sora train configs/demo/train.py --data-path $(DEMO_DIR)/cache --outputs $(DEMO_DIR)/outputs \
	  --num-workers 2 --epochs $(DEMO_EPOCHS)
	@# The committed demo model (configs/demo/model, made by `make demo-model`) samples the demo's captions.
	$(BIN)/sora sample configs/demo/inference.py --save-dir $(DEMO_DIR)/samples
	@# Long video: 3 clips of 8 frames, 2 carried over (20 frames); its first frame is a demo clip's.
	$(BIN)/sora sample configs/demo/inference.py --save-dir $(DEMO_DIR)/samples-long \
	  --prompt "$(DEMO_LONG_PROMPT)" --loop 3 --condition-frame-length 2 \
	  --reference-path $(DEMO_DIR)/data/$(DEMO_LONG_REFERENCE) --mask-strategy "0,0,0,1,0"
	$(BIN)/sora demo-eval $(DEMO_DIR)/samples-long
	@# Judge from the pixels (background colour, shape colour, shape, direction): the fresh
	@# model's last previews, then the demo model's samples.
	$(BIN)/sora demo-eval "$$(ls -d $(DEMO_DIR)/outputs/*/previews/step-* | tail -1)"
	$(BIN)/sora demo-eval $(DEMO_DIR)/samples
	@echo
	@echo "demo data:        $(DEMO_DIR)/data/data.csv"
	@echo "resolved configs: $(DEMO_DIR)/train.resolved.py, $(DEMO_DIR)/inference.resolved.py"
	@echo "cache:            $(DEMO_DIR)/cache (manifest.json; v-<id>/: buckets/, rejects.arrow, probe.arrow)"
	@echo "bucket report:    above, and drawn in $(DEMO_DIR)/buckets.png"
	@echo "fresh model:      $$(ls -d $(DEMO_DIR)/outputs/*/checkpoints/step-* | tail -1) (losses.jsonl, eval_losses.jsonl, tensorboard/ beside it)"
	@echo "its previews:     $$(ls -d $(DEMO_DIR)/outputs/*/previews/step-* | tail -1)/contact_sheet.png"
	@echo "demo model:       configs/demo/model (make demo-model)"
	@echo "sampled videos:   $(DEMO_DIR)/samples/*.mp4"
	@echo "long video:       $$(ls $(DEMO_DIR)/samples-long/*.mp4) (20 frames: 3 clips, the first frame $(DEMO_LONG_REFERENCE)'s)"
	@echo "judged:           above; frames and verdicts in $(DEMO_DIR)/samples/contact_sheet.png"
	@echo
	@echo "try it in a browser: $(BIN)/serve run configs/serve.yaml   then open http://127.0.0.1:8000/ (README, Serving)"

# The committed demo model: more demo data, the same commands, longer. Writes configs/demo/model/.
demo-model: setup
	$(BIN)/sora demo-data $(DEMO_MODEL_DIR)/data --num $(DEMO_MODEL_SAMPLES)
	$(BIN)/sora preprocess $(DEMO_MODEL_DIR)/data/data.csv --config configs/demo/train.py --cache-dir $(DEMO_MODEL_DIR)/cache
	$(BIN)/sora train configs/demo/train.py --data-path $(DEMO_MODEL_DIR)/cache --outputs $(DEMO_MODEL_DIR)/outputs \
	  --num-workers 2 --epochs $(DEMO_MODEL_EPOCHS)
	mkdir -p configs/demo/model
	cp "$$(ls -d $(DEMO_MODEL_DIR)/outputs/*/checkpoints/step-* | tail -1)/ema.safetensors" configs/demo/model/ema.safetensors
	@echo "demo model: configs/demo/model/ema.safetensors (EMA weights of $$(ls -d $(DEMO_MODEL_DIR)/outputs/*/checkpoints/step-* | tail -1))"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest

bench: setup
	@# gpu_check.py is the GPU check (make gpu-check), not a CPU benchmark.
	@for script in $(filter-out benchmarks/gpu_check.py,$(wildcard benchmarks/*.py)); do \
	  echo "== $$script"; $(BIN)/python $$script || exit 1; done

# The GPU check runs with the python that has torch: the project's .venv here, the system's on a
# bare GPU machine (no install there: its torch stays). Wheels in gpu-wheels/ are installed first.
GPU_PYTHON := $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

# DeepSpeed and diffusers with the dependencies a machine with torch and transformers lacks, as
# wheels (DeepSpeed's ops compile at run time); about 10 MiB, to carry to a machine without a
# network. GPU_PY is that machine's Python (binary wheels must match it): python3 -c 'import sys; print(sys.version_info[:2])'.
GPU_PY ?= 3.11
GPU_WHEELS := diffusers hjson py-cpuinfo ninja msgpack pydantic pydantic-core annotated-types typing-inspection nvidia-ml-py
gpu-wheels: setup
	mkdir -p gpu-wheels
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PY) \
	  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
	  --dest gpu-wheels $(GPU_WHEELS)
	DS_BUILD_OPS=0 $(BIN)/pip wheel --quiet --no-deps --no-build-isolation --wheel-dir gpu-wheels \
	  "deepspeed==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("deepspeed"))')"
	@du -sh gpu-wheels

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache
