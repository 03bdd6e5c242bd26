# Task runner. `make setup` builds .venv from scratch (torch 2.14.1 + torchvision
# 0.29.1 come from this machine's local disk through pip); the other targets use it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test lint data quickstart clean

setup: $(BIN)/lightly-mcp-installed

$(BIN)/lightly-mcp-installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# One pytest-xdist worker per core, one thread per worker (tests/conftest.py).
test: setup data
	$(BIN)/python -m pytest -q -n auto

lint: setup
	$(BIN)/ruff check lightly_mcp tests
	$(BIN)/ruff format --check lightly_mcp tests
	$(BIN)/mypy lightly_mcp

# Fashion-MNIST from Debian (real data, offline afterwards); without it the quickstart
# falls back to scikit-learn's bundled digits and says so.
data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then \
		echo "Fashion-MNIST present in /usr/share/datasets/fashion-mnist"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
		|| echo "could not install dataset-fashion-mnist: using scikit-learn digits"; \
	else \
		echo "run 'sudo apt-get install dataset-fashion-mnist' for Fashion-MNIST; using scikit-learn digits"; \
	fi

quickstart: setup data
	$(BIN)/lightly-mcp run recipes/quickstart.yaml --out runs/quickstart

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
