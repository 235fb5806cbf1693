#!/usr/bin/env bash
# One GPU call, no vLLM: benchmarks/kernels/tree_attention_latency.py for the carried build
# (medusa_vllm/_C.abi3.so, built here with MEDUSA_VLLM_CUDA=1) and for an older build
# (.carry/old_so/_C.abi3.so, its commit in .carry/old_so/REV), in turns, then the comparison and
# the CUDA correctness case of the new build. Carry: medusa_vllm/_C.abi3.so, .carry/old_so,
# .git_commit. Results and logs to $OUT.
#   bash tools/gpu/kernel_latency.sh "[tree_attention_latency.py args]"
set -u
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
new=$(cat .git_commit 2>/dev/null || echo head)
old=$(cat .carry/old_so/REV 2>/dev/null || echo old)
old_tree=/tmp/old_tree
rm -rf "$old_tree" && mkdir -p "$old_tree"
cp -r medusa_vllm training benchmarks "$old_tree"/
cp .carry/old_so/_C.abi3.so "$old_tree"/medusa_vllm/_C.abi3.so
for side in old new old2 new2; do
    case $side in
        old|old2) dir=$old_tree; rev=$old ;;
        *) dir=$PWD; rev=$new ;;
    esac
    extra=""; case $side in old2|new2) extra="--sweep-batches" ;; esac  # repeats: the launch's own choice only
    # shellcheck disable=SC2086
    (cd "$dir" && MEDUSA_GIT_COMMIT=$rev timeout "${TP_TIMEOUT:-200}" python3 benchmarks/kernels/tree_attention_latency.py \
        --label "${side}_$rev" --out "$OUT" ${1:-} $extra > "$OUT/latency_${side}.log" 2>&1)
    echo "$side ($rev) rc=$?"; tail -3 "$OUT/latency_${side}.log" | cut -c1-200
done
for pair in "old new" "old2 new2"; do
    set -- $pair
    python3 benchmarks/kernels/tree_attention_latency.py --compare "$OUT"/tree_attention_latency_*_"$1"_*.json \
        "$OUT"/tree_attention_latency_*_"$2"_*.json > "$OUT/compare_$1_$2.txt" 2>&1
done
# the repeats live on in their comparison; fewer files under $OUT come back whole
rm -f "$OUT"/tree_attention_latency_*_old2_*.json "$OUT"/tree_attention_latency_*_new2_*.json "$OUT"/latency_*2.log
head -70 "$OUT/compare_old_new.txt"; tail -n +2 "$OUT/compare_old2_new2.txt" | head -40
python3 benchmarks/kernels/memcheck_case.py 2>&1 | tail -12
