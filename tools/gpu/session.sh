#!/usr/bin/env bash
# One GPU call after the kit is staged (earlier calls: vk1a and vk1b with tools/gpu/stage_vk1.sh
# — tools/gpu/split_vk1.sh makes them: the repo no longer fits a call beside the whole vk1 —
# then vk2 and vk3 with their device_setup.sh; the first session call also carries vk2b, which
# split_vk1.sh makes; this call carries vk4, medusa_vllm/_C.abi3.so (built here with
# MEDUSA_VLLM_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0a python setup.py build_ext --inplace: sm_90a only,
# 8 MB; the default sm_90a + sm_80 + PTX build was 20 MB with the split-merge modes, too big beside vk4 and
# the repository) and .carry/mt_bench_question.jsonl):
#   bash tools/gpu/session.sh throughput  "<benchmarks/throughput.py args>"
#   bash tools/gpu/session.sh equivalence "<benchmarks/equivalence.py args>"
#   bash tools/gpu/session.sh step_cost   "<benchmarks/step_cost.py args>"   (untrained heads made here)
#   bash tools/gpu/session.sh step_log    "<tools/gpu/step_log.py args>"  (every step of the rounds)
#   bash tools/gpu/session.sh step_cost_ab "<step_cost args>"  (this tree vs .carry/ab_tree: pack_ab_tree.sh)
#   bash tools/gpu/session.sh smoke       "<tree> [SPEC_JSON]"              (tools/gpu/plugin_smoke.py)
#   bash tools/gpu/session.sh graph_check "<tree> [N]"                      (tools/gpu/graph_check.py)
#   bash tools/gpu/session.sh sampled_check "[tree]"                        (tools/gpu/sampled_check.py)
#   bash tools/gpu/session.sh pytest "[test paths]"                         (default tests/kernels)
#   bash tools/gpu/session.sh verify_step_cost "<tools/gpu/verify_step_cost.py args>"  (no vLLM engine)
# Results (--out, default <bench>_<gpu>.json) and the log go to $OUT; TP_TIMEOUT (s) bounds the
# benchmark; SESSION_MODEL / SESSION_HEADS replace the bundled model and heads (e.g. /tmp/qwen_hf
# from tools/gpu/stage_qwen.sh and heads trained by training/gpu_recipe.sh). The JIT caches live in
# /tmp/jit_cache (tools/gpu/env.sh): SAVE_JIT_CACHE=1 returns them in $OUT, and a call carrying
# .carry/jit_cache (those files) starts its engines from them (tools/gpu/jit_cache.sh).
bench=${1:-throughput}
bash .carry/vk4/device_setup.sh | tail -2
source tools/gpu/env.sh
# SAVE_JIT_CACHE=1: the JIT caches go back in $OUT too, for the next session's carry (jit_cache.sh)
[ "${SAVE_JIT_CACHE:-0}" = 1 ] && trap 'bash tools/gpu/jit_cache.sh save' EXIT
export MEDUSA_VLLM_MTBENCH="$PWD/.carry/mt_bench_question.jsonl"
nvidia-smi -L
python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
heads=${SESSION_HEADS:-medusa_vllm/data/heads/smollm2-135m-instruct}
MODEL=${SESSION_MODEL:-$MODEL}
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o -i "[ABHL][0-9]\{2,3\}" | head -1 | tr A-Z a-z)
if [ "$bench" = smoke ]; then
    # $2: "<tree> [SPEC_JSON]" (no spaces inside the JSON)
    # shellcheck disable=SC2086
    timeout "${TP_TIMEOUT:-540}" python3 tools/gpu/plugin_smoke.py "$MODEL" "$heads" ${2:-sparse-15} \
        > "$OUT/smoke.log" 2>&1
    echo "smoke rc=$?"; grep -v "^INFO\|^(EngineCore\|^WARNING" "$OUT/smoke.log" | tail -40
    exit 0
fi
if [ "$bench" = pytest ]; then
    # $2: test paths (default: the GPU kernel and graph tests); the summary lines go to $OUT too
    # shellcheck disable=SC2086
    timeout "${TP_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -rf ${2:-tests/kernels} \
        > "$OUT/pytest.log" 2>&1
    echo "pytest rc=$?"; grep -a -E "^(FAILED|ERROR)|passed|failed|^E  " "$OUT/pytest.log" | cut -c1-300 | tail -40
    exit 0
fi
if [ "$bench" = verify_step_cost ]; then
    # the verify step alone, greedy against sampled (tools/gpu/verify_step_cost.py), no engine
    # shellcheck disable=SC2086
    timeout "${TP_TIMEOUT:-240}" python3 tools/gpu/verify_step_cost.py --out "$OUT/verify_step_cost_${gpu:-gpu}.json" \
        $2 > "$OUT/verify_step_cost.log" 2>&1
    echo "verify_step_cost rc=$?"; grep -a -v "^INFO\|^WARNING" "$OUT/verify_step_cost.log" | cut -c1-200 | tail -80
    exit 0
fi
if [ "$bench" = sampled_check ]; then
    # shellcheck disable=SC2086
    timeout "${TP_TIMEOUT:-240}" python3 tools/gpu/sampled_check.py "$MODEL" "$heads" ${2:-default-63} \
        > "$OUT/sampled_check.log" 2>&1
    echo "sampled_check rc=$?"; grep -a -v "^INFO\|^(EngineCore\|^WARNING\|^(Worker" "$OUT/sampled_check.log" | cut -c1-300 | tail -70
    grep -a "CUDA graph\|captured\|disagrees\|failed" "$OUT/sampled_check.log" | cut -c1-300 | tail -12
    exit 0
fi
if [ "$bench" = graph_check ]; then
    # shellcheck disable=SC2086
    timeout "${TP_TIMEOUT:-240}" python3 tools/gpu/graph_check.py "$MODEL" "$heads" ${2:-default-63 4} \
        > "$OUT/graph_check.log" 2>&1
    echo "graph_check rc=$?"; grep -a "graph check\|CUDA graph\|Error\|Traceback" "$OUT/graph_check.log" | cut -c1-400 | tail -20
    exit 0
fi
if [ "$bench" = step_log ]; then
    # tools/gpu/step_log.py: every step of throughput.py's rounds, per configuration
    # shellcheck disable=SC2086
    timeout "${TP_TIMEOUT:-540}" python3 tools/gpu/step_log.py --model "$MODEL" --heads "$heads" \
        --out "$OUT/step_log_${gpu:-gpu}.json" $2 > "$OUT/step_log.log" 2>&1
    echo "step_log rc=$?"; grep -a -v "^INFO\|^(EngineCore\|^WARNING\|^(Worker" "$OUT/step_log.log" \
        | grep -a "round\|steps\|slow\|Error" | cut -c1-330 | tail -120
    exit 0
fi
if [ "$bench" = step_cost_ab ]; then
    # this tree against .carry/ab_tree (tools/gpu/pack_ab_tree.sh), tree configs in turns
    # old, new, old, new, each in its own engine; $2: step_cost args without --configs/--out.
    # TP_TIMEOUT bounds each run: the first starts two engines (plain, then old tree), about
    # 250 s on an H100 (200 s cut its tree off at 45a52b6); the others about 120 s each
    python3 tools/gpu/make_zero_heads.py "$MODEL" /tmp/zero_heads
    cp medusa_vllm/_C.abi3.so .carry/ab_tree/medusa_vllm/
    old=$(cat .carry/ab_tree/REV); new=$(cat .git_commit 2>/dev/null || echo head)
    i=0
    for side in old new old new; do
        i=$((i + 1)); dir=$PWD; rev=$new
        [ "$side" = old ] && dir=$PWD/.carry/ab_tree && rev=$old
        configs=tree64_async; [ $i = 1 ] && configs="plain_v1_async tree64_async"
        # shellcheck disable=SC2086
        (cd "$dir" && MEDUSA_GIT_COMMIT=$rev PYTHONPATH="$dir:$PYTHONPATH" timeout "${TP_TIMEOUT:-540}" python3 benchmarks/step_cost.py \
            --model "$MODEL" --heads /tmp/zero_heads --configs $configs \
            --out "$OUT/step_cost_ab_${i}_${rev}.json" $2 > "$OUT/step_cost_ab_${i}_${rev}.log" 2>&1)
        echo "$i $side ($rev) rc=$?"; grep -a "ms/step" "$OUT/step_cost_ab_${i}_${rev}.log" | grep -v "^INFO" | tail -8
    done
    exit 0
fi
if [ "$bench" = step_cost ]; then
    python3 tools/gpu/make_zero_heads.py "$MODEL" /tmp/zero_heads
    heads=/tmp/zero_heads
fi
timeout "${TP_TIMEOUT:-540}" python3 "benchmarks/$bench.py" --model "$MODEL" --heads "$heads" \
    --out "$OUT/${bench}_${gpu:-gpu}.json" $2 > "$OUT/$bench.log" 2>&1
echo "$bench rc=$?"
grep -E "tok/s|failed|Error|error|summary|Traceback|identical|divergence|ms" "$OUT/$bench.log" \
    | grep -v "^INFO\|^(EngineCore" | tail -60
