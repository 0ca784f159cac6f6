# Two entry points for a fresh machine: `make demo` (the main job end to end) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT ?= exports/default-int8

.PHONY: install demo test test-fast lint bench web browser

$(BIN)/parscale: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[export,dev,bench,serve,serve-ray]"
	touch $@

install: $(BIN)/parscale

# The JavaScript pinned by web/package-lock.json: onnxruntime-web and @huggingface/tokenizers for the
# in-browser page (`parscale web`), transformers.js for tests/test_web.py (both test files skip without it).
# ONNXRUNTIME_NODE_INSTALL=skip: onnxruntime-node's install script would fetch CUDA binaries from
# outside the npm registry; its CPU binaries ship in the package, and CPU is all the test uses.
web/node_modules/.package-lock.json: web/package.json web/package-lock.json
	@if command -v npm >/dev/null; then \
		cd web && ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund; \
	else echo "npm not found: tests/test_web.py (transformers.js) will be skipped"; fi

web: web/node_modules/.package-lock.json

# Debian's chromium for tests/test_browser.py, which drives it headless with Playwright (Playwright's
# own browser download is not reachable from CI). Installed with apt-get when missing and possible
# (root); otherwise the browser tests are skipped, saying why.
CHROMIUM := /usr/bin/chromium
browser:
	@if [ -x $(CHROMIUM) ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y chromium || { apt-get update && apt-get install -y chromium; } \
		|| echo "apt-get could not install chromium: tests/test_browser.py will be skipped"; \
	else echo "chromium not found and apt-get not usable here (needs root): tests/test_browser.py will be skipped"; fi

# Export the embedded default model at P = 1, 2, 4 and 8 over its one backbone (int8, every P validated
# against PyTorch), then generate from the one folder at each P with the torch-free runtime.
demo: install
	$(BIN)/parscale export --P 1,2,4,8 --int8 -o $(OUT) --force
	for P in 1 2 4 8; do echo "--- P=$$P"; \
		$(BIN)/parscale generate $(OUT) --P $$P --prompt "def fibonacci(n):" --max-new-tokens 48 || exit 1; done

lint: install
	$(BIN)/ruff check .

test: install lint web browser
	$(BIN)/python -m pytest -q

# The inner loop: everything not marked slow (under a minute); CI runs the whole suite (`make test`).
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python -m benchmarks.run
