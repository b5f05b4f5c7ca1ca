# Two commands do everything on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.clips4-installed
PYTHON ?= python3

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# the exact tested versions (constraints.txt); torch first, so nothing else can pull a different build
	$(PY) -m pip install -q -c constraints.txt torch torchvision
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/clips4 demo

# test processes (pytest-xdist; each test file runs whole in one of them); TEST_WORKERS=0 runs the suite in one
TEST_WORKERS ?= 2

test: setup
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: setup
	$(PY) benchmarks/segments.py --limit 10 --thresholds 25

clean:
	rm -rf cache outputs runs .pytest_cache
