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
# An NVIDIA GPU is present when nvidia-smi lists one.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)

# Tests and the demo never touch the network: models are made locally.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test lint format bench clean help

help:
	@echo "make demo   set up .venv, make demo data and tiny models, run the pipeline as far as it goes"
	@echo "make test   set up .venv, lint and run the test suite"
	@echo "make bench  run the benchmarks in benchmarks/"
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
	$(BIN)/sora demo-data $(DEMO_DIR)/data
	$(BIN)/sora debug-models $(DEMO_DIR)/models
	$(BIN)/sora config configs/debug/train.py > $(DEMO_DIR)/train.resolved.py
	$(BIN)/sora config configs/debug/inference.py > $(DEMO_DIR)/inference.resolved.py
	$(BIN)/sora preprocess $(DEMO_DIR)/data/data.csv --config configs/debug/train.py --cache-dir $(DEMO_DIR)/cache
	$(BIN)/sora bucket-report $(DEMO_DIR)/cache --config configs/debug/train.py --plot $(DEMO_DIR)/buckets.png
	$(BIN)/sora train configs/debug/train.py --data-path $(DEMO_DIR)/cache --outputs $(DEMO_DIR)/outputs --num-workers 2
	$(BIN)/sora sample configs/debug/inference.py --ckpt-path $(DEMO_DIR)/outputs --save-dir $(DEMO_DIR)/samples
	@# Long video: 3 clips of 8 frames, 2 carried over (20 frames), conditioned on demo files:
	@# an image as the first frame; a clip's first 4 frames to open, the image to close (half edited).
	$(BIN)/sora sample configs/debug/inference.py --ckpt-path $(DEMO_DIR)/outputs --save-dir $(DEMO_DIR)/samples-long \
	  --prompt "an orange circle on a white background" --prompt "an orange circle moves right on a purple background" \
	  --loop 3 --condition-frame-length 2 --batch-size 2 \
	  --reference-path $(DEMO_DIR)/data/image_017.png --mask-strategy "0,0,0,1,0" \
	  --reference-path "$(DEMO_DIR)/data/clip_002.mp4;$(DEMO_DIR)/data/image_017.png" --mask-strategy "0,0,0,4,0;1,2,0,1,-1,0.5"
	@# Judge the samples from their pixels: background colour, shape colour, shape, direction.
	$(BIN)/sora demo-eval $(DEMO_DIR)/samples
	@echo
	@echo "demo data:        $(DEMO_DIR)/data/data.csv"
	@echo "debug models:     $(DEMO_DIR)/models/t5, $(DEMO_DIR)/models/vae"
	@echo "resolved configs: $(DEMO_DIR)/train.resolved.py, $(DEMO_DIR)/inference.resolved.py"
	@echo "cache:            $(DEMO_DIR)/cache (manifest.json, buckets/, rejects.arrow, probe.arrow)"
	@echo "bucket report:    above, and drawn in $(DEMO_DIR)/buckets.png"
	@echo "trained model:    $$(ls -d $(DEMO_DIR)/outputs/*/checkpoints/step-* | tail -1) (losses.jsonl, tensorboard/ beside it)"
	@echo "sampled videos:   $$(ls $(DEMO_DIR)/samples/*.mp4 | tr '\n' ' ')"
	@echo "long videos:      $$(ls $(DEMO_DIR)/samples-long/*.mp4 | tr '\n' ' ')(20 frames: 3 clips, conditioned on demo files)"
	@echo "judged:           above; frames and verdicts in $(DEMO_DIR)/samples/contact_sheet.png"
	@echo
	@echo "serve it over HTTP:  $(BIN)/serve run configs/serve.yaml   (then see README, Serving)"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest

bench: setup
	@for script in benchmarks/*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache
