# Two entry points for a fresh machine: `make demo` (the main job end to end) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT ?= exports/default-p4-int8

.PHONY: install demo test lint bench

$(BIN)/parscale: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[export,dev]"
	touch $@

install: $(BIN)/parscale

# Export the embedded default model (P=4, int8) and generate from it with the torch-free runtime.
demo: install
	$(BIN)/parscale export --P 4 --int8 -o $(OUT) --force
	$(BIN)/parscale generate $(OUT) --prompt "def fibonacci(n):" --max-new-tokens 64

lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python -m benchmarks.run
