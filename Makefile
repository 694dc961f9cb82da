# The README's commands. Everything installs into .venv in this folder; llama-cpp-python is
# built once per version and flags and cached in ~/.cache/corral/wheels (see packaging/).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEPS := $(VENV)/.corral-deps
SOURCES := engine discovery gui tests bench packaging corral_pkg

.PHONY: run test bench reliability models install lint clean bundle

$(DEPS): pyproject.toml packaging/install_llama.py packaging/system-deps.sh
	bash packaging/system-deps.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q ".[gui,dev]"
	$(BIN)/python packaging/install_llama.py
	touch $@

# A regular (non-editable) install of this tree, so a package missing from pyproject fails.
install: $(DEPS)
	$(BIN)/python -m pip install -q --no-deps --force-reinstall .

models: install
	$(BIN)/corral models

lint: install
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/ruff format --check $(SOURCES)
	$(BIN)/mypy

test: lint models
	$(BIN)/python -m pytest

# With a display: the desktop app. Without one: the headless demo (two local agents).
run: install models
	@if [ -n "$${DISPLAY:-}$${WAYLAND_DISPLAY:-}" ]; then \
		$(BIN)/corral; \
	else \
		$(BIN)/corral demo; \
	fi

# Every figure in docs/ (about 15 minutes on 2 cores; discovery needs root for namespaces).
bench: install models
	$(BIN)/python bench/generation.py
	$(BIN)/python bench/tunnel.py
	$(BIN)/python bench/failure.py
	$(BIN)/python bench/agent_kill.py
	$(BIN)/python bench/discovery.py
	$(BIN)/python bench/planner_speed.py
	$(BIN)/python bench/plan_accuracy.py

# docs/RELIABILITY.md: 100,000+ fuzz cases, every fault 20 times, load, and a 30-minute soak
# (about 75 minutes on 2 cores; the partition trials need root for network namespaces).
# `make test` runs one trial of each (tests/reliability).
reliability: install models
	$(BIN)/python bench/fuzz.py --cases 100000
	$(BIN)/python bench/reliability.py --trials 20 --soak-minutes 30

# The desktop app as one folder, dist/corral/ (PyInstaller; docs/OPERATIONS.md).
bundle: install
	bash packaging/bundle/build.sh dist

clean:
	rm -rf $(VENV) build dist *.egg-info
