#!/usr/bin/env bash
# CPU machine, repository root: FlashAttention 3 for the GPU kit (../shared/device/ leaves vLLM's
# FlashAttention binaries out: _vllm_fa3_C is 153 MB, but 8 MB under xz -9).
#   bash tools/gpu/pack_fa3.sh     -> .carry/fa3/_vllm_fa3_C.abi3.so.xz (+ .sha256), from vLLM's wheel
# On the GPU machine, after the staging call of vk2b (vLLM's Python tree is then in /tmp/site):
#   bash tools/gpu/stage_fa3.sh    (carrying .carry/fa3): FLASH_ATTN works there, for
#   benchmarks/throughput.py --attention flash (vLLM's configurations and medusa_vllm's prefill chunks)
set -euo pipefail
VLLM_VERSION=${VLLM_VERSION:-0.26.0}
WORK=${WORK_DIR:-/tmp/vllm-kit-work}
OUT=${OUT_DIR:-.carry}/fa3
mkdir -p "$WORK" "$OUT"
wheel=$(ls "$WORK"/vllm-"$VLLM_VERSION"-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d "$WORK" "vllm==$VLLM_VERSION"
  wheel=$(ls "$WORK"/vllm-"$VLLM_VERSION"-*.whl | head -1)
fi
unzip -p "$wheel" vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so > "$WORK/_vllm_fa3_C.abi3.so"
(cd "$WORK" && sha256sum _vllm_fa3_C.abi3.so > "$OLDPWD/$OUT/_vllm_fa3_C.abi3.so.sha256")
xz -T2 -9 -c "$WORK/_vllm_fa3_C.abi3.so" > "$OUT/_vllm_fa3_C.abi3.so.xz"
ls -l "$OUT"
