# `make test` and `make demo` work on a fresh machine with only Python 3.11 + pip.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test demo install bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The test command (README.md and .ci/run call exactly this).
test: $(STAMP)
	$(PY) -m pytest tests

demo: $(STAMP)
	$(PY) -m jdistill.demo --out=demo_out

bench: $(STAMP)
	$(PY) bench/loss_memory.py
	$(PY) bench/sampler.py
	$(PY) bench/train_step.py

clean:
	rm -rf $(VENV) demo_out runs
