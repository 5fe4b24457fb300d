# unipruning: set-up, run, tests and benchmarks. Every target uses the project's virtualenv.
PY       ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
# torch 2.13.0: on CPU-only machines that carry its CPU wheel on disk pip takes it from there
# (cheap); elsewhere pip takes the regular build for the platform (CUDA on a Linux GPU machine).
TORCH    ?= torch==2.13.0

.PHONY: setup install prepare run test test-fast test-slow bench bench-ci bench-gate gpu-check-cpu clean

setup: install prepare          ## install everything and prepare the offline model and corpora

install: $(BIN)/unipruning

$(BIN)/unipruning: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

prepare: install                ## idempotent: verifies hashes, redoes only what is missing
	$(BIN)/unipruning prepare

run: setup                      ## the main job: prune the embedded default model with the defaults
	$(BIN)/unipruning prune

test: setup                     ## the default suite, what CI runs: unit, stage and end-to-end tests (all but slow)
	$(BIN)/python -m pytest -q

test-fast: setup                ## unit and stage tests, under 3 minutes
	$(BIN)/python -m pytest -q -m 'not slow and not e2e'

test-slow: setup                ## real-model checks that take minutes
	$(BIN)/python -m pytest -q -m slow

gpu-check-cpu: setup           ## scripts/gpu_check.py's CPU form end to end (every part, 2 ranks), as CI runs it
	$(BIN)/python -m pytest -q -m slow tests/test_gpu_check.py

bench: setup                    ## full tier: every method and pattern on the default model (table in bench-out/), then the full gate
	$(BIN)/python scripts/bench_methods.py --out bench-out
	$(BIN)/python scripts/bench_gate.py --tier full --json bench-out/gate-full.json

bench-ci: setup                 ## the small regression tier that CI runs: fails on a worse perplexity or time ratio
	$(BIN)/python scripts/bench_gate.py --tier ci --json bench-out/gate-ci.json

clean:
	rm -rf runs bench-out .pytest_cache
