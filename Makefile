# make test | build | bench | clean | distclean
#
# PY selects the interpreter for the tests and the benchmark, for example
#   make test PY=~/.pyenv/versions/3.9.18/bin/python
# Each Python version gets its own virtual environment at .venv/X.Y, made by tests/bootstrap.sh.
# TESTS selects test files or folders (default tests); PYTEST_ARGS passes extra arguments to
# pytest, for example: make test TESTS=tests/test_harness.py PYTEST_ARGS="-x".

PY ?= python3
PYVER := $(shell $(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
VENV := .venv/$(PYVER)
TESTS ?= tests
PYTEST_ARGS ?=

.PHONY: test build bench clean distclean check-python

check-python:
	@test -n "$(PYVER)" || { echo "make: error: interpreter '$(PY)' not found or does not start; set PY to a Python 3.9+ path" >&2; exit 1; }

test: check-python
	bash tests/bootstrap.sh $(PY)
	$(VENV)/bin/python -m pytest -q $(TESTS) $(PYTEST_ARGS)

build:
	bash build.sh

# Measures the proxy against a direct connection and rewrites docs/benchmarks.md.
bench: check-python
	bash tests/bootstrap.sh $(PY)
	$(VENV)/bin/python bench/bench.py

# Remove build output and caches; the virtual environments stay (see distclean).
clean:
	rm -rf dist .pytest_cache
	find . -path ./.venv -prune -o -path ./.git -prune -o -type d -name __pycache__ -exec rm -rf {} +

distclean: clean
	rm -rf .venv
