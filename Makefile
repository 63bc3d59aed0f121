# Newcomer commands, both from a fresh clone:
#   make test   set up .venv (if needed) and run the test command (bash tests/run.sh: both pytest tiers;
#               ARGS="-x tests/test_masks.py ..." passes pytest arguments)
#   make demo   set up .venv (if needed) and run the quick demo (vlmsparse demo --quick)
# Setup installs torch==2.13.0 first, by itself (a bare "torch" requirement would pull a multi-GB CUDA build),
# then the package with its dev extras at the versions CI pins (.ci/constraints.txt). It runs again when
# setup.py, pyproject.toml or the constraints change; `make clean-venv` removes .venv.
# Another environment: make test VENV=$PWD/.ci-venv-oldest CONSTRAINTS=.ci/constraints-oldest.txt

VENV := $(CURDIR)/.venv
CONSTRAINTS := .ci/constraints.txt
PYTHON := $(VENV)/bin/python
SETUP_DONE := $(VENV)/.vlmsparse-setup-done
DEMO_ARGS ?= --quick

.PHONY: setup test lint demo clean-venv

setup: $(SETUP_DONE)

$(SETUP_DONE): setup.py pyproject.toml $(CONSTRAINTS)
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[dev]" -c $(CONSTRAINTS)
	touch $@

test: $(SETUP_DONE)
	PYTHON=$(PYTHON) bash tests/run.sh $(ARGS)

lint: $(SETUP_DONE)
	$(VENV)/bin/ruff check .

demo: $(SETUP_DONE)
	$(VENV)/bin/vlmsparse demo $(DEMO_ARGS)

clean-venv:
	rm -rf $(VENV)
