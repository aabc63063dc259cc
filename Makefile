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
