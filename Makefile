# Any python3 >= 3.11 on PATH (python3 itself first, then the newest python3.X), or `make PY=/path/to/python`.
PY ?= $(firstword $(foreach p,python3 python3.14 python3.13 python3.12 python3.11,$(shell \
	command -v $(p) >/dev/null 2>&1 && $(p) -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null && echo $(p))))
VENV := .venv
GPU_VENV := .venv-gpu
TPU_VENV := .venv-tpu
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.installed-runtime
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo_out

.PHONY: demo test install install-gpu install-tpu bench clean

%/bin/python:
	$(if $(PY),,$(error needs Python >= 3.11: put one on PATH or pass PY=/path/to/python))
	$(PY) -m venv $*
	$*/bin/pip install -q --upgrade pip

# The runtime alone (what `make demo` needs); the tests add torch, transformers, peft, openai, pytest, and libtpu
# (the `tpu` extra), whose topology descriptions let the suite compile for real TPU slices on this CPU.
$(RUNTIME): setup.py | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $(RUNTIME)

$(STAMP): setup.py | $(BIN)/python
	$(BIN)/pip install -q -e ".[test,tpu]"
	touch $(RUNTIME) $(STAMP)

install: $(STAMP)

# Accelerator environments, each in its own venv: jax's CUDA 12 plugin (with its CUDA libraries) for the
# SLURM launcher, libtpu for the TPU pod launcher.
$(GPU_VENV)/.installed: setup.py | $(GPU_VENV)/bin/python
	$(GPU_VENV)/bin/pip install -q -e ".[cuda]"
	touch $@

install-gpu: $(GPU_VENV)/.installed

$(TPU_VENV)/.installed: setup.py | $(TPU_VENV)/bin/python
	$(TPU_VENV)/bin/pip install -q -e ".[tpu]"
	touch $@

install-tpu: $(TPU_VENV)/.installed

demo: $(RUNTIME)
	$(BIN)/xllava demo --out $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python benchmarks/model_bench.py

clean:
	rm -rf $(VENV) $(GPU_VENV) $(TPU_VENV) .pytest_cache
