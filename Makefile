# Every target builds its own virtual environment first; nothing depends on what is installed already.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# On this project's offline machines MNIST comes from ../shared; elsewhere tensorflow-datasets fetches it.
SHARED_MNIST := $(abspath ../shared/datasets/mnist)
ifneq ($(wildcard $(SHARED_MNIST)/train-images-idx3-ubyte*),)
export DIGITS_JAX_DATA_DIR ?= $(SHARED_MNIST)
endif
# XLA:CPU allocates large temporaries; glibc huge pages make them much cheaper to fault in (measured in
# ../shared/docs/PERF_NOTES.md). glibc ignores the tunable where it does not know it.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1
# GPU=1 (or yes, true) installs jax with CUDA 12 wheels instead of the CPU build; each flavour has its own stamp.
# Without GPU a .venv keeps the flavour it has; GPU=0 (no, false) goes back to the CPU build and removes the CUDA
# plugin that GPU=1 left (JAX would otherwise look for a GPU).
# Other values are an error on the command line; from the environment (set for something else) they are ignored.
FLAGS := 0 1 yes no true false
valid = $(if $(filter-out $(FLAGS),$(1))$(word 2,$(1)),$(if $(filter command line,$(origin $(2))),$(error \
	$(2)=$(1): write $(2)=1 or $(2)=0)),ok)
GPU_ON := $(if $(and $(strip $(GPU)),$(call valid,$(GPU),GPU)),$(filter 1 yes true,$(GPU)),$(wildcard \
	$(VENV)/.installed-cuda12))
RESUME_ON := $(if $(call valid,$(RESUME),RESUME),$(filter 1 yes true,$(RESUME)))
FLAVOUR := $(if $(GPU_ON),cuda12,cpu)
JAX_SPEC := $(if $(GPU_ON),jax[cuda12],jax)
STAMP := $(VENV)/.installed-$(FLAVOUR)

.PHONY: setup train seed best ensemble ladder eval serve report fonts runs bench bench-peers profile chaos test lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]' '$(JAX_SPEC)'
	$(if $(GPU_ON),,$(PY) -m pip uninstall -qq --yes jax-cuda12-plugin jax-cuda12-pjrt)
	rm -f $(VENV)/.installed-*
	touch $@

setup: $(STAMP)

train: setup  ## train the default config into runs/default and report its test accuracy
	$(PY) -m digits_jax train --config default --workdir runs/default $(if $(RESUME_ON),--resume) $(ARGS)

seed: setup  ## the original Keras recipe (Adam 1e-4, 10 epochs)
	$(PY) experiments/seed.py $(ARGS)

eval: setup  ## make eval CKPT=runs/default
	@test -n "$(CKPT)" || (echo "usage: make eval CKPT=RUN_DIR_OR_CHECKPOINT" >&2; exit 2)
	$(PY) -m digits_jax eval --checkpoint $(CKPT) $(ARGS)

serve: setup  ## make serve CKPT=runs/default: a page at http://127.0.0.1:8000/ to draw digits on
	@test -n "$(CKPT)" || (echo "usage: make serve CKPT=RUN_DIR_OR_CHECKPOINT" >&2; exit 2)
	$(PY) -m digits_jax serve --checkpoint $(CKPT) $(ARGS)

report: setup  ## make report RUN=runs/default: learning curves, confusion, mistakes and report.md in RUN/report
	@test -n "$(RUN)" || (echo "usage: make report RUN=RUN_DIR" >&2; exit 2)
	$(PY) -m digits_jax report $(RUN) $(ARGS)

fonts: setup  ## typeset digits from 8 fonts through preprocess + predict (experiments/fonts.py); CKPT=runs/default
	$(PY) experiments/fonts.py --checkpoint $(or $(CKPT),runs/default) $(ARGS)

best: setup  ## the best single-model recipe (config best), test accuracy of the epoch chosen on validation
	$(PY) experiments/best.py $(ARGS)

ensemble: setup  ## the best recipe with 3 seeds (ARGS="--models bn strided" adds a model), probabilities averaged
	$(PY) experiments/ensemble.py $(ARGS)

ladder: setup  ## seed -> architecture -> augmentation -> schedule -> EMA -> TTA -> ensemble, 3 seeds per rung
	$(PY) experiments/ladder.py $(ARGS)

bench: setup  ## seed CNN throughput and the fast preset's time to 99% (experiments/bench.py)
	$(PY) experiments/bench.py $(ARGS)

bench-peers: setup  ## ours beside Keras, PyTorch, naive Flax and a fast PyTorch recipe (../shared/peers)
	$(PY) experiments/bench_peers.py $(ARGS)

profile: setup  ## per-op times of a preset's compiled training epoch (default: seed), from a JAX profiler trace
	$(PY) experiments/profile_step.py $(ARGS)

chaos: setup  ## SIGKILL training at random moments and damage checkpoints; resumed runs must be bitwise equal
	$(PY) experiments/chaos.py $(ARGS)

runs: setup  ## compare every run under runs/
	$(PY) -m digits_jax runs runs/*

# --dist loadscope keeps each module on one worker, so its module-scoped training runs are made once, not per worker.
test: setup lint  ## the suite on every core (pytest-xdist); ARGS="-n 0" runs it in one process
	$(PY) -m pytest -q -n auto --dist loadscope $(ARGS)

lint: setup
	$(VENV)/bin/ruff check digits_jax tests experiments
	$(VENV)/bin/mypy

clean:  ## remove the virtual environment (runs/ holds results and is kept)
	rm -rf $(VENV)
