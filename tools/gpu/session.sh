#!/usr/bin/env bash
# One GPU call after the kit is staged (vk1..vk3 in earlier calls; this call carries vk4,
# medusa_vllm/_C.abi3.so and .carry/mt_bench_question.jsonl):
#   bash tools/gpu/session.sh throughput  "<benchmarks/throughput.py args>"
#   bash tools/gpu/session.sh equivalence "<benchmarks/equivalence.py args>"
#   bash tools/gpu/session.sh step_cost   "<benchmarks/step_cost.py args>"
# step_cost needs untrained heads in its args: python3 tools/gpu/make_zero_heads.py first.
# Results (--out) and the log go to $OUT; TP_TIMEOUT (s) bounds the benchmark.
bench=${1:-throughput}
bash .carry/vk4/device_setup.sh | tail -2
source tools/gpu/env.sh
export MEDUSA_VLLM_MTBENCH="$PWD/.carry/mt_bench_question.jsonl"
nvidia-smi -L
python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
heads=()
[ "$bench" != step_cost ] && heads=(--heads medusa_vllm/data/heads/smollm2-135m-instruct)
timeout "${TP_TIMEOUT:-540}" python3 "benchmarks/$bench.py" --model "$MODEL" "${heads[@]}" \
    --out "$OUT/${bench}_h100.json" $2 > "$OUT/$bench.log" 2>&1
echo "$bench rc=$?"
grep -E "tok/s|failed|Error|error|summary|Traceback|identical|divergence|ms" "$OUT/$bench.log" \
    | grep -v "^INFO\|^(EngineCore" | tail -60
