PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.installed-runtime
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo_out

.PHONY: demo test install bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The runtime alone (what `make demo` needs); the test extra adds torch, transformers, peft, openai, pytest.
$(RUNTIME): setup.py | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $(RUNTIME)

$(STAMP): setup.py | $(BIN)/python
	$(BIN)/pip install -q -e ".[test]"
	touch $(RUNTIME) $(STAMP)

install: $(STAMP)

demo: $(RUNTIME)
	$(BIN)/xllava demo --out $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python benchmarks/model_bench.py

clean:
	rm -rf $(VENV) .pytest_cache
