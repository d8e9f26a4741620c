# Two commands on a fresh machine: `make demo` (main job on the embedded default) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
TINY := .cache/tiny-sd
TINY_CN := .cache/tiny-controlnet

.PHONY: setup demo test bench clean

setup: $(STAMP)

# Re-installs when pyproject.toml changes; torch/torchvision pins come from pip's local cache here.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[test]'
	@touch $(STAMP)

$(TINY)/model_index.json: | $(STAMP)
	$(BIN)/dreamshard tiny-model $(TINY)

$(TINY_CN)/config.json: | $(STAMP)
	$(BIN)/dreamshard tiny-model $(TINY_CN) --preset tiny-controlnet

demo: setup $(TINY)/model_index.json
	$(BIN)/dreamshard generate configs/quickstart.yaml

test: setup
	$(BIN)/python -m pytest -q

bench: setup $(TINY)/model_index.json
	$(BIN)/python -m bench

clean:
	rm -rf runs .cache .pytest_cache
