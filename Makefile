# The two commands of the README. Each one creates the virtual environment when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DURATION ?= 20

.PHONY: run test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[train,export,openvino,mm,dist,dev]'
	touch $@

## run: the live daemon on the simulated scope with the shipped model, for DURATION seconds
run: $(VENV)/.installed
	$(PY) -m live.run --scope config.toml --duration $(DURATION)

## test: lint, type-check and the whole test suite
test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) -m benchmarks.optics
	$(PY) -m benchmarks.engine
	$(PY) -m benchmarks.host_path
	$(PY) -m benchmarks.live

clean:
	rm -rf $(VENV) runs out
