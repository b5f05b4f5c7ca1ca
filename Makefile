# Two commands do everything on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.clips4-installed
PYTHON ?= python3

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned, so nothing else can pull a different build
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/clips4 demo

test: setup
	$(VENV)/bin/pytest -q

bench: setup
	$(PY) benchmarks/segments.py --limit 10 --thresholds 25

clean:
	rm -rf cache outputs runs .pytest_cache
