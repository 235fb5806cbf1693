#!/usr/bin/env bash
# One GPU call, no vLLM: benchmarks/kernels/tree_attention_latency.py for the carried build
# (medusa_vllm/_C.abi3.so, built here with MEDUSA_VLLM_CUDA=1) and for an older build
# (.carry/old_so/_C.abi3.so, its commit in .carry/old_so/REV), in turns, then the comparison and
# the CUDA correctness case of the new build. Carry: medusa_vllm/_C.abi3.so, .carry/old_so,
# .git_commit. Results and logs to $OUT.
#   bash tools/gpu/kernel_latency.sh "[tree_attention_latency.py args]"
# Default args "--q-lens 16 64 --contexts 256 --sweep-batches" (each run ~15-20 s). KERNEL_TESTS=1
# also runs tests/kernels/test_tree_attention.py -k cuda (pytest.log). Every file under $OUT is
# one of at most 8 that come back: tar them if there are more.
set -u
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
new=$(cat .git_commit 2>/dev/null || echo head)
old=$(cat .carry/old_so/REV 2>/dev/null || echo old)
old_tree=/tmp/old_tree
rm -rf "$old_tree" && mkdir -p "$old_tree"
cp -r medusa_vllm training benchmarks "$old_tree"/
cp .carry/old_so/_C.abi3.so "$old_tree"/medusa_vllm/_C.abi3.so

run_side() {  # run_side SIDE DIR REV ARGS: one latency run, labelled SIDE_REV
    local side=$1 dir=$2 rev=$3 args=$4 extra=""
    case $side in *2) extra="--sweep-batches" ;; esac  # repeats: the launch's own choice only
    # shellcheck disable=SC2086
    (cd "$dir" && MEDUSA_GIT_COMMIT=$rev timeout "${TP_TIMEOUT:-200}" \
        python3 benchmarks/kernels/tree_attention_latency.py --label "${side}_$rev" --out "$OUT" $args $extra \
        > "$OUT/latency_${side}.log" 2>&1)
    echo "$side ($rev) rc=$?"; tail -3 "$OUT/latency_${side}.log" | cut -c1-200
}

compare() {  # compare OLD_SIDE NEW_SIDE
    python3 benchmarks/kernels/tree_attention_latency.py --compare "$OUT"/tree_attention_latency_*_"$1"_*.json \
        "$OUT"/tree_attention_latency_*_"$2"_*.json 2>&1
}

for round in "" 2; do
    run_side "old$round" "$old_tree" "$old" "${1:-}"
    run_side "new$round" "$PWD" "$new" "${1:-}"
done
compare old new > "$OUT/compare_old_new.txt"
compare old2 new2 > "$OUT/compare_old2_new2.txt"
# the repeats live on in their comparison; fewer files under $OUT come back whole
rm -f "$OUT"/tree_attention_latency_*_old2_*.json "$OUT"/tree_attention_latency_*_new2_*.json "$OUT"/latency_*2.log
head -70 "$OUT/compare_old_new.txt"; tail -n +2 "$OUT/compare_old2_new2.txt" | head -40
python3 benchmarks/kernels/memcheck_case.py 2>&1 | tail -12
if [ "${KERNEL_TESTS:-0}" = 1 ]; then  # the CUDA kernel tests (no vLLM needed)
    timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -x \
        tests/kernels/test_tree_attention.py -k cuda > "$OUT/pytest.log" 2>&1
    echo "== tests rc=$?: $(tail -1 "$OUT/pytest.log")"
fi
