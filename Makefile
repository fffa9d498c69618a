# `make train` and `make test` install what is missing into .venv, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: train test bench bench-train clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

train: $(VENV)/.installed
	$(PY) train_timm.py $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

bench: $(VENV)/.installed
	$(PY) -m benchmarks.overhead

# train_timm.py's default run against a bare fp32 loop (writes benchmarks/results/train_throughput.md)
bench-train: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.train_throughput

clean:
	rm -rf $(VENV) output *.egg-info
