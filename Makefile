# Two commands are all the set-up a newcomer needs:
#   make demo   installs everything into .venv and runs the SFT lifecycle on the embedded default
#   make test   installs everything into .venv and runs the tests
# (`make test-fast` runs only the unit tests: no Prefect server, no training, no browser)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: install demo test test-slow test-fast lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: the CPU build here, the CUDA build on a GPU machine
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[gguf,eval,dev]"
	# llama.cpp's HF-to-GGUF converter, from the sdist of the pinned llama-cpp-python
	$(PY) -m tasks.export.gguf_converter
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m flows.sft --spec examples/sft-tiny.yaml

# the tests run in parallel processes (pytest-xdist): most of their time is spent waiting on
# servers and subprocesses; tests sharing a trained run are kept on one worker (loadgroup)
PYTEST_WORKERS ?= 4

test: install
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup -m "not slow"

# the tests that take over a minute alone (a real `prefect deploy --all` with workers, the GRPO
# recipe as shipped, the docs' curl sequence and the skill's commands as written, the UI clicked
# through, two TrainJob nodes, the FSDP path, lifecycles killed and resumed): CI runs them too
test-slow: install
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup -m slow

test-fast: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup -m "not server and not train and not browser"

lint: install
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m ruff format --check .

clean:
	rm -rf runs .pytest_cache
