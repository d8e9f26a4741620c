# Two commands on a fresh machine: `make demo` (main job on the embedded default) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
TINY := .cache/tiny-sd
TINY_CN := .cache/tiny-controlnet

.PHONY: setup demo test test-fast test-min lint format bench clean

setup: $(STAMP)

# The package declares lower bounds (a cluster's own CUDA torch stays); constraints.txt pins the versions
# this repo is tested with. Re-installs when either changes.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt -e '.[test,s3]'
	@touch $(STAMP)

$(TINY)/model_index.json: | $(STAMP)
	$(BIN)/dreamshard tiny-model $(TINY)

$(TINY_CN)/config.json: | $(STAMP)
	$(BIN)/dreamshard tiny-model $(TINY_CN) --preset tiny-controlnet

demo: setup $(TINY)/model_index.json
	$(BIN)/dreamshard generate configs/quickstart.yaml

# Two test processes, each with its own local Ray, one test file each at a time (module fixtures built once):
# most tests wait on process start-up, Ray workers and model loads, so two share 2 cores well.
PYTEST := $(BIN)/python -m pytest -q -n 2 --dist loadfile

test: setup lint
	$(PYTEST)

# Unit tests only: no end-to-end runs (those are marked slow).
test-fast: setup
	$(PYTEST) -m "not slow"

# The declared lower bounds (docs/install.md): a fresh venv with every direct dependency at its oldest supported
# version (constraints-min.txt; torch/torchvision excepted), then test-fast's tests. Leaves .venv alone.
VENV_MIN := .venv-min

test-min:
	rm -rf $(VENV_MIN)
	$(PYTHON) -m venv $(VENV_MIN)
	$(VENV_MIN)/bin/python -m pip install --disable-pip-version-check -q -c constraints-min.txt -e '.[test,s3]'
	$(VENV_MIN)/bin/python -m pytest -q -n 2 --dist loadfile -m "not slow"

lint: setup
	$(BIN)/ruff check dreamshard tests bench
	$(BIN)/ruff format --check dreamshard tests bench
	$(BIN)/mypy

format: setup
	$(BIN)/ruff check --fix dreamshard tests bench
	$(BIN)/ruff format dreamshard tests bench

bench: setup $(TINY)/model_index.json
	$(BIN)/python -m bench

clean:
	rm -rf runs .cache .pytest_cache
