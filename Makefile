# The two commands of the README: `make demo` and `make test`. Each creates or reuses .venv with pip.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.recache-installed

.PHONY: install demo test bench lint weights clean

# torch is pinned and installed first so pip takes the local CPU wheel and never resolves a CUDA build.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/recache demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/sampling_speed.py
	$(PY) bench/embedded_quality.py
	$(PY) bench/caching_speed.py
	$(PY) bench/data_parallel.py

lint: $(STAMP)
	$(VENV)/bin/ruff check recache tests bench

# Reproduce the committed weights of the embedded models (about 30 minutes on 2 cores; mnist-flux uses one thread).
weights: $(STAMP)
	$(VENV)/bin/recache pretrain dit --overwrite
	$(VENV)/bin/recache pretrain classifier --overwrite
	$(VENV)/bin/recache pretrain flux --overwrite

clean:
	rm -rf $(VENV) runs .pytest_cache
