# fedvault: the two commands.
#   make demo   set up .venv (if needed) and run the default simulation
#   make test   set up .venv (if needed) and run the whole test suite
#
# torch is installed first and pinned to 2.13.0: on this machine pip takes the
# CPU build from disk; an unpinned torch would pull a multi-GB CUDA build.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedvault-installed

.PHONY: demo test test-fast rehearse bench lint setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedvault simulate

rehearse: $(STAMP)
	$(BIN)/fedvault rehearse --sites 3

# two workers on two cores: the Ray simulations run one at a time on one worker, the
# real-process deployments one at a time on the other (tests/conftest.py groups them),
# the unit tests fill in; a deployment waiting for Flower's heartbeats or process
# start-up leaves its core to the other worker
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup

# the edit loop: unit and property tests only (no Ray simulations, no SuperLink)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not e2e and not loopback"

bench: $(STAMP)
	$(BIN)/python bench/footprint.py
	$(BIN)/python bench/startup.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy .
	$(BIN)/lint-imports
	$(BIN)/mkdocs build --strict --quiet --site-dir build/docs

clean:
	rm -rf $(VENV) runs build *.egg-info .pytest_cache .mypy_cache .ruff_cache
