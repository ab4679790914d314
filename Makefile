# rayhorde: every entry point does its own set-up (venv, packages, container engine, test image).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
ENGINE := scripts/container-engine.sh

.PHONY: setup demo test test-unit bench clean-venv

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

setup: $(VENV)/.installed
	$(ENGINE) start
	$(ENGINE) image

# The engine is stopped again when this target started it (nothing the demo starts survives).
demo: $(VENV)/.installed
	@started=0; $(ENGINE) running || started=1; \
	$(ENGINE) start && $(ENGINE) image && $(VENV)/bin/rayhorde demo; rc=$$?; \
	if [ $$started = 1 ]; then $(ENGINE) stop; fi; exit $$rc

test: $(VENV)/.installed
	@started=0; $(ENGINE) running || started=1; \
	$(ENGINE) start && $(ENGINE) image && $(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$started = 1 ]; then $(ENGINE) stop; fi; exit $$rc

test-unit: $(VENV)/.installed
	$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

bench: $(VENV)/.installed
	@started=0; $(ENGINE) running || started=1; \
	$(ENGINE) start && $(ENGINE) image && $(PY) -m benchmarks; rc=$$?; \
	if [ $$started = 1 ]; then $(ENGINE) stop; fi; exit $$rc
