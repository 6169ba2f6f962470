# Two commands do all the set-up on a fresh machine (no GPU, no hub access needed):
#   make demo   create .venv, install, train the tiny model on the embedded data, then sample and evaluate it
#   make test   same install plus the test requirements (requirements-dev.txt), then the whole test suite (what CI runs)
# make test-fast skips the tests marked slow (end-to-end runs over about 5 s each).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export PYTHONUNBUFFERED := 1
DEMO_DIR ?= outputs/tiny

.PHONY: install install-dev demo test test-fast test-all clean

$(VENV)/.installed: requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

demo: install
	$(PY) tools/demo.py --out $(DEMO_DIR)

test: install-dev
	$(PY) -m pytest -q

test-fast: install-dev
	$(PY) -m pytest -q -m "not slow"

test-all: test

clean:
	rm -rf $(VENV) outputs
