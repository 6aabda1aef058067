# Two entry points: `make demo` and `make test`. Both create .venv if missing and install
# torch==2.13.0 first (the CPU build on disk), then the package with its dev extra.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) launch.py demo

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf .venv runs
