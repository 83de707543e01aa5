# The two commands of the quick start: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install test demo bench bench-deps clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,lgb]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

demo: $(STAMP)
	$(VENV)/bin/qcelery demo

# pyqlib is heavy (jupyter, ...); it is only needed to run Qlib beside us in bench/
bench-deps: $(STAMP)
	$(PY) -m pip install -q pyqlib

clean:
	rm -rf .qcelery build *.egg-info
