#!/usr/bin/env bash
# One GPU call after staging (carry as tools/gpu/session.sh's, plus .carry/oldmv: `git archive
# <old rev> medusa_vllm tools/gpu training`, heads removed, REV naming the rev): the sampled
# step's ops on the GPU, medusa_vllm's against the previous ones.
#   1. the GPU tests of target_probs, rejection_walk, top-k/top-p and the graphed steps;
#   2. the verify step (tools/gpu/verify_step_cost.py: sampled and top-p, default-63) with
#      vLLM's filter and the tensor walk, with medusa_vllm's target_probs and rejection_walk,
#      and the old package's beside them on this host;
#   3. sampled throughput (temperature 0.8, no filter: the walk op's case), interleaved closed
#      rounds at 1 / 8 / 32: no speculation, default-63 with the tensor walk, with the op.
# Results in $OUT: pytest.log, vsc_*.json + logs, sampled_ab.json + throughput.log.
set -u
TP_TIMEOUT=${PYTEST_TIMEOUT:-170} bash tools/gpu/session.sh pytest \
    "tests/kernels/test_rejection_walk_cuda.py tests/kernels/test_target_probs_cuda.py tests/kernels/test_target_probs.py tests/kernels/test_top_k_top_p_cuda.py tests/kernels/test_graphed_step_cuda.py"
source tools/gpu/env.sh
vsc() {  # $1: name, $2: directory of the package, $3: filter, $4: walk
    (cd "$2" && MEDUSA_VLLM_TOP_K_TOP_P=$3 MEDUSA_VLLM_REJECTION_WALK=$4 PYTHONPATH=$PWD:${PYTHONPATH:-} timeout 100 \
        python3 tools/gpu/verify_step_cost.py --trees default-63 --variants sampled top-p --steps 100 \
        --out "$OUT/vsc_$1.json" > "$OUT/vsc_$1.log" 2>&1)
    echo "vsc $1 rc=$?"
    python3 - "$OUT/vsc_$1.json" <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except OSError:
    sys.exit()
print(d["config"].get("filter"), d["config"].get("walk"),
      {k: {v: s[v] for v in ("sampled", "top-p") if v in s} for k, s in d["summary"]["wall_us_per_step"].items()})
PY
}
vsc vllm_tensor "$PWD" vllm tensor
vsc medusa_kernel "$PWD" medusa kernel
if [ -d .carry/oldmv ]; then
    cp medusa_vllm/_C.abi3.so .carry/oldmv/medusa_vllm/
    vsc "old_$(cat .carry/oldmv/REV)" "$PWD/.carry/oldmv" vllm tensor
fi
[ "${SKIP_THROUGHPUT:-0}" = 1 ] && exit 0
TP_TIMEOUT=${THROUGHPUT_TIMEOUT:-330} bash tools/gpu/session.sh throughput "--interleave --attention flash \
--temperature 0.8 --batch-sizes 1 8 32 --rounds 3 --configs baseline medusa-v2:default-63 \
medusa-v2:default-63+MEDUSA_VLLM_REJECTION_WALK=kernel --out $OUT/sampled_ab.json"
