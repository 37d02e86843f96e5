# Two commands on a fresh machine:  make demo   |   make test
# Each creates or updates its own virtual environment in .venv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch 2.14.1 + torchvision 0.29.1 are the newest pair this project is tested with.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: venv demo test test-fast bench clean slurm-up slurm-down

venv: $(STAMP)
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: venv
	$(PY) tools/demo.py

test: venv
	$(PY) -m pytest -q -ra --durations=15 tests

test-fast: venv
	$(PY) -m pytest -q -ra -m "not slow and not slurm" tests

bench: venv
	$(PY) tools/bench_data.py
	$(PY) tools/bench_train.py

slurm-up:
	bash slurm/local/up.sh

slurm-down:
	bash slurm/local/down.sh

clean:
	rm -rf demo out runs .pytest_cache
