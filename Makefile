# Two commands do all the set-up on a fresh machine (no GPU, no hub access needed):
#   make demo   create .venv, install, train the tiny model on the embedded data, then sample and evaluate it
#   make test   same install plus the test requirements (requirements-dev.txt), then the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export PYTHONUNBUFFERED := 1
DEMO_DIR ?= outputs/tiny

.PHONY: install install-dev demo test test-all clean

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
	$(PY) -m pytest -q -m "not slow"

test-all: install-dev
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) outputs
