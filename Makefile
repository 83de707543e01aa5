# The two commands of the quick start: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# apt-get needs root; elsewhere try sudo without a password prompt
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)

.PHONY: install lint test demo browser bench bench-deps clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,lgb]'
	touch $(STAMP)

install: $(STAMP)

# headless Chromium drives Flower in tests/test_flower.py (Debian packages)
browser:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
		echo "installing chromium and chromium-driver with apt-get (for the Flower browser test)"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	fi

# static checks, seconds with mypy's cache: ruff (lint and format) on the whole tree, mypy on
# qcelery/ and workers/ (configured in pyproject.toml)
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# lint first, so a new finding fails CI before the suite runs
test: lint browser
	$(PY) -m pytest -q -p no:cacheprovider --basetemp=$(CURDIR)/.pytest-tmp tests

demo: $(STAMP)
	$(VENV)/bin/qcelery demo

# pyqlib is heavy (jupyter, ...) and pins its own versions: it lives in a venv of its
# own, which the benchmarks in bench/ run as subprocesses to measure Qlib beside us
bench-deps: $(STAMP)
	test -x .venv-qlib/bin/python || $(PYTHON) -m venv .venv-qlib
	.venv-qlib/bin/python -m pip install -q pyqlib

clean:
	rm -rf .qcelery build *.egg-info
