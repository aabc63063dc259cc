# `make demo` and `make test` each do all set-up on a fresh machine: a virtual environment with the
# pinned stack (requirements.txt; torch/torchvision from the machine's local wheels via plain pip).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

.PHONY: venv demo tmgf-demo test test-fast lint bench clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m demo

tmgf-demo: $(STAMP)
	$(PY) -m demo.tmgf

test: $(STAMP) lint
	$(PY) -m pytest -q tests

# the suite without the slow and SLURM tests (a few minutes): for the edit-test loop
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not slurm" tests

# ruff and mypy, configured in pyproject.toml
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) bench/eval.py
	$(PY) bench/data.py

clean:
	rm -rf $(VENV) .pytest_cache

# -- container images (docs/containers.md): docker/images.py with podman, nothing from a container
# registry; on a fresh machine it installs podman, runc and debootstrap with apt (root)
IMAGES := python3 docker/images.py

.PHONY: image image-gpu image-test image-sif image-apptainer image-clean image-clean-all

# reid-trainer:cpu (docker/Dockerfile.cpu)
image:
	$(IMAGES) build cpu

# reid-trainer:gpu (docker/Dockerfile, ~8 GB): built, then torch (for CUDA 13.0), faiss-gpu and DeepSpeed import
image-gpu:
	$(IMAGES) build gpu
	$(IMAGES) check gpu

# the CPU image built; in it pat_smoke trains and evaluates and the tests selected by IMAGE_TESTS pass
# (IMAGE_TEST_GPU=1: image-gpu too)
IMAGE_TESTS ?= not slow and not slurm
image-test: image $(if $(filter 1,$(IMAGE_TEST_GPU)),image-gpu)
	$(IMAGES) test cpu -m "$(IMAGE_TESTS)"

# the CPU image as an Apptainer SIF, .cache/containers/reid-cpu.sif
image-sif: image
	$(IMAGES) sif

# launch/slurm.py --cluster local --tasks-per-node 2 --apptainer SIF exp=pat_smoke, compared with the same run
# without the container (same final weights)
image-apptainer: $(STAMP) image-sif
	$(IMAGES) apptainer-run --venv $(VENV)

# the trainer images and the SIF (the build cache stays: the next build reuses it)
image-clean:
	$(IMAGES) clean

# everything docker/images.py made: images, build cache, base images, .cache/containers
image-clean-all:
	$(IMAGES) clean --all
