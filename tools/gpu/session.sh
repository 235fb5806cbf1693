#!/usr/bin/env bash
# One GPU call after the kit is staged (vk1..vk3 in earlier calls; this call carries vk4,
# medusa_vllm/_C.abi3.so and .carry/mt_bench_question.jsonl):
#   bash tools/gpu/session.sh "<throughput.py args>"
# Results and logs go to $OUT.
bash .carry/vk4/device_setup.sh | tail -2
source tools/gpu/env.sh
export MEDUSA_VLLM_MTBENCH="$PWD/.carry/mt_bench_question.jsonl"
nvidia-smi -L
python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
timeout "${TP_TIMEOUT:-540}" python3 benchmarks/throughput.py --model "$MODEL" \
    --heads medusa_vllm/data/heads/smollm2-135m-instruct --out "$OUT/throughput_h100.json" $1 \
    > "$OUT/throughput.log" 2>&1
echo "throughput rc=$?"
grep -E "tok/s|failed|Error|error|summary|Traceback" "$OUT/throughput.log" | grep -v "^INFO" | tail -60
