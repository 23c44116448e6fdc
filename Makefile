# The two commands of the README. Each one creates the virtual environment when it is missing
# and installs what it needs into it: `make run` only the daemon on the simulated scope,
# `make test` everything the tests need (a later `make run` then installs nothing).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DURATION ?= 20
RUN_EXTRAS := openvino,sim
TEST_EXTRAS := train,export,openvino,mm,dist,dev,sim,view

.PHONY: run test bench clean

# Install `.[EXTRAS]` into the venv (made if missing) and say how long it took.
define install
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@start=$$(date +%s); \
	$(PY) -m pip install -q -e '.[$(1)]' && \
	echo "installed .[$(1)] into $(VENV) in $$(( $$(date +%s) - start )) s"
endef

$(VENV)/.installed-run: pyproject.toml
	$(call install,$(RUN_EXTRAS))
	touch $@

$(VENV)/.installed-test: pyproject.toml
	$(call install,$(TEST_EXTRAS))
	touch $@ $(VENV)/.installed-run

## run: the live daemon on the simulated scope with the shipped model, for DURATION seconds
run: $(VENV)/.installed-run
	$(PY) -m live.run --scope config.toml --duration $(DURATION)

## test: lint, type-check and the whole test suite
test: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest

bench: $(VENV)/.installed-test
	$(PY) -m benchmarks.optics
	$(PY) -m benchmarks.engine
	$(PY) -m benchmarks.host_path
	$(PY) -m benchmarks.live --results benchmarks/results/live_bench.json

clean:
	rm -rf $(VENV) runs out
