# `make demo` and `make test` work on a fresh machine with only Python 3.11 + pip.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
LOG    := $(VENV)/install.log

.PHONY: test lint format demo experiment agentic foreign merge-ten loss-grid install bench bench-venv compare clean

# Install output goes to a log and is shown (its tail) only when the install fails.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing jdistill and its test dependencies into $(VENV) (log: $(LOG))"
	@( $(PY) -m pip install --upgrade pip && $(PY) -m pip install -e '.[test]' ) > $(LOG) 2>&1 \
	  || { echo "install failed; the last lines of $(LOG):"; tail -n 40 $(LOG); exit 1; }
	@touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The test command (README.md and .ci/run call exactly this): style first, then the suite in
# TEST_WORKERS processes, one test file per process at a time (module fixtures built once).
TEST_WORKERS ?= 2
test: lint
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=40 tests

# The long jobs share one persistent XLA compilation cache: a cell compiles the programs the
# cells before it did (same shapes, new closures), and on CPU the compile is ~28% of a cell's
# time (docs/experiment.md, "Cost"). Results are bit-identical with it (measured). The size
# limit turns on the cache's file lock: two shards write the same entries.
LONG_JOBS := demo experiment agentic foreign merge-ten loss-grid
$(LONG_JOBS): export JAX_COMPILATION_CACHE_DIR := $(CURDIR)/runs/jax_cache
$(LONG_JOBS): export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS := 0
$(LONG_JOBS): export JAX_COMPILATION_CACHE_MAX_SIZE := 8589934592

demo: $(STAMP)
	@$(PY) -m jdistill demo --out=demo_out

# The question's grid (docs/experiment.md): the dial's teachers first, then the lr sweep and
# the cells in two processes (one per core), then the report. Every piece is cached: a re-run
# resumes where the last one stopped. `make loss-grid` runs the earlier loss x teachers grid.
QUESTION := $(PY) -m jdistill question --out=runs/question
experiment: $(STAMP)
	@$(PY) -m jdistill dial --out=runs/dial --alphas=1
	@$(PY) -m jdistill dial --out=runs/dial --knob=token --alphas=0.5,1
	@$(QUESTION) --shard=0/2 & $(QUESTION) --shard=1/2; wait
	@$(QUESTION)

# The agentic domain (docs/experiment.md, "Agentic"): lookup teachers that call a tool, OPD on
# the student's multi-turn episodes per loss at its swept lr; cached, two processes.
agentic: $(STAMP)
	@$(PY) -m jdistill agentic --build_only
	@$(PY) -m jdistill agentic --shard=0/2 & $(PY) -m jdistill agentic --shard=1/2; wait
	@$(PY) -m jdistill agentic --shard=0/2 & $(PY) -m jdistill agentic --shard=1/2; wait
	@$(PY) -m jdistill agentic
	@cp runs/agentic/agentic.md runs/agentic/agentic.json docs/results/

# A teacher of another tokenizer (docs/experiment.md, "A teacher of another tokenizer"): its
# BPE teacher and char twin, OPD from it directly against SFT on its data; cached; the report
# is copied to docs/results/foreign.{md,json}.
foreign: $(STAMP)
	@$(PY) -m jdistill foreign --out=runs/foreign
	@cp runs/foreign/foreign.md runs/foreign/foreign.json docs/results/

# Ten lineage teachers into one student, V4 vs Ultra at equal budget (docs/experiment.md,
# "Merge ten"): the 10-domain world, then both recipes per seed, cached; the report is copied
# to docs/results/merge_ten.{md,json}.
merge-ten: $(STAMP)
	@$(PY) -m jdistill merge_ten --out=runs/merge_ten
	@cp runs/merge_ten/merge_ten.md runs/merge_ten/merge_ten.json docs/results/

loss-grid: $(STAMP)
	@$(PY) -m jdistill experiment --out=runs/experiment

bench: $(STAMP)
	$(PY) bench/loss_memory.py
	$(PY) bench/loss_cost.py
	$(PY) bench/overlap_calibration.py
	$(PY) bench/sampler.py
	$(PY) bench/shared_prefix.py
	$(PY) bench/bf16_rollouts.py
	$(PY) bench/train_step.py
	$(PY) bench/stages.py
	$(PY) bench/disaggregated.py
	$(PY) bench/alignment.py
	$(PY) bench/report_samples.py
	$(PY) bench/teachers.py

# bench/compare.py (jdistill vs Tunix vs transformers/PyTorch) needs Tunix, which is only a
# bench dependency: it goes into its own venv (.venv-bench, jdistill[test,bench]), never .venv.
BENCH_VENV  := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed
BENCH_LOG   := $(BENCH_VENV)/install.log
COMPARE_ARGS ?= --vocab 32000,151936 --repeats 3

$(BENCH_STAMP): pyproject.toml bench/requirements-tunix.txt
	@test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	@echo "installing jdistill[test,bench] (Tunix) into $(BENCH_VENV) (log: $(BENCH_LOG))"
	@( $(BENCH_VENV)/bin/python -m pip install --upgrade pip \
	   && $(BENCH_VENV)/bin/python -m pip install -e '.[test,bench]' ) > $(BENCH_LOG) 2>&1 \
	  || { echo "install failed; the last lines of $(BENCH_LOG):"; tail -n 40 $(BENCH_LOG); exit 1; }
	@touch $(BENCH_STAMP)

bench-venv: $(BENCH_STAMP)

# e.g. make compare COMPARE_ARGS="--vocab 32000,151936 --repeats 3 --json compare.json"
compare: $(BENCH_STAMP)
	$(BENCH_VENV)/bin/python bench/compare.py $(COMPARE_ARGS)

clean:
	rm -rf $(VENV) $(BENCH_VENV) demo_out runs
