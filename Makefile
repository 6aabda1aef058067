# Two entry points: `make demo` and `make test`. Both create .venv if missing and install
# torch==2.13.0 first (the CPU build on disk), then the package with its dev extra.
# `make lint` (same install): ruff's lint rules and format check, then mypy; .ci/run runs it before the tests.
# `make test` is the whole suite on two pytest-xdist workers (tests/conftest.py keeps the tests that share a
# costly build on one worker); `make test-fast` leaves out the `slow` tests: the edit loop.
# PYTEST_ARGS adds arguments to both (a file, -k, -x).
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: demo test test-fast lint install clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) launch.py demo

XDIST := -n 2 --dist loadgroup

test: $(STAMP)
	$(PY) -m pytest -q $(XDIST) --durations=25 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m "not slow" --durations=10 $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

clean:
	rm -rf .venv runs
