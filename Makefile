# make tutorial  - set up a home in ./xpr_home and run every workflow's quick tutorial chain
# make test      - the fast test suite (CI, with CI=true, runs the slow tests too)
# make test-all  - every test, slow ones included
# Each target creates .venv and installs xpr into it when missing or out of date.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
XPR    := $(VENV)/bin/xpr
STAMP  := $(VENV)/.installed
HOME_DIR ?= $(CURDIR)/xpr_home
PYTEST_MARK := $(if $(CI),,-m "not slow")

.PHONY: tutorial test test-all bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dask]'
	touch $(STAMP)

tutorial: $(STAMP)
	XPR_HOME=$(HOME_DIR) bash scripts/tutorial.sh $(XPR)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_MARK)

test-all: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) xpr_home build dist *.egg-info
