# Two commands do everything on a fresh machine:
#   make demo   - set up, then run a closed-loop campaign on the simulated rig (SQLite ledger)
#   make test   - set up, then lint, type-check and run the test suite
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: demo test setup benchmark

setup: $(VENV)/.installed

# torch first, pinned to the CPU build on this machine's disk; anything newer pulls a CUDA build
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/supraopt demo --world-seed 3   # a twin whose hidden physics differs from the prior

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	bash .ci/ensure-chromium   # Debian's chromium for the dashboard's browser tests
	bash .ci/with-postgres $(BIN)/pytest -q

benchmark: setup
	$(BIN)/supraopt benchmark
