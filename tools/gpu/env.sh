#!/usr/bin/env bash
# Source on the GPU machine after the vLLM carry kit is staged (shared/device/README.md):
#   source tools/gpu/env.sh
# Makes this repo importable as medusa_vllm (with the carried, prebuilt medusa_vllm/_C.abi3.so),
# registers its vLLM plugin entry point, and points MODEL at the converted SmolLM2 folder.
set -e
source /tmp/vk_env.sh
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PYTHONPATH="$REPO:$PYTHONPATH"
SITE=${SITE_DIR:-/tmp/site}
INFO="$SITE/medusa_vllm-0.1.0.dist-info"
mkdir -p "$INFO"
printf 'Metadata-Version: 2.1\nName: medusa_vllm\nVersion: 0.1.0\n' > "$INFO/METADATA"
printf '[vllm.general_plugins]\nmedusa_vllm = medusa_vllm.vllm_plugin:register\n' > "$INFO/entry_points.txt"
export MODEL="$VK_MODEL" HF_HUB_OFFLINE=1 VLLM_WORKER_MULTIPROC_METHOD=spawn
# the JIT caches in one folder, restored from the carry when one came (tools/gpu/jit_cache.sh)
export JIT_CACHE=${JIT_CACHE:-/tmp/jit_cache}
export VLLM_CACHE_ROOT=$JIT_CACHE/vllm TRITON_CACHE_DIR=$JIT_CACHE/triton TORCHINDUCTOR_CACHE_DIR=$JIT_CACHE/inductor
bash "$REPO/tools/gpu/jit_cache.sh" restore
export MEDUSA_GIT_COMMIT="$(cat "$REPO/.git_commit" 2>/dev/null || echo unknown)"
python3 -c "
import sys, torch, medusa_vllm.kernels as k
cuda = k.have_extension() and torch._C._dispatch_has_kernel_for_dispatch_key('medusa_vllm::tree_attention', 'CUDA')
print('medusa_vllm extension:', k.have_extension(), 'CUDA kernels:', cuda, k.extension_error() or '')
sys.exit(0 if cuda else 'medusa_vllm/_C.abi3.so has no CUDA kernels: MEDUSA_VLLM_CUDA=1 python setup.py build_ext --inplace')
" || exit 1
set +e
