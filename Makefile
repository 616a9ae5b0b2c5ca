# Two commands: `make demo` (the main job: the SFT -> RM -> DPO -> GRPO pipeline) and
# `make test` (the whole suite; `make test-fast` skips the tests marked slow).
# `make demo` resumes where it stopped; `make clean` starts over.
# `make notebooks` executes the tutorials in notebooks/ and prints each one's wall time.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/pipeline

.PHONY: demo test test-fast notebooks lint docs clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m launch.pipeline --config=configs/pipeline.py:demo --workdir=$(DEMO_DIR)

test: $(VENV)/.installed-dev
	$(PY) -m pytest

test-fast: $(VENV)/.installed-dev
	$(PY) -m pytest -m "not slow"

notebooks: $(VENV)/.installed-dev
	$(PY) notebooks/run_all.py

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .

docs: $(VENV)/.installed
	$(PY) -m launch.config_doc

clean:
	rm -rf runs .pytest_cache
