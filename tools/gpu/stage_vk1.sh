#!/usr/bin/env bash
# GPU machine, repository root, in the calls carrying .carry/vk1a and .carry/vk1b
# (tools/gpu/split_vk1.sh): stages the half that came; with both, rebuilds the kit's
# vllm_C.so.xz and runs the kit's set-up (which then installs it).
set -euo pipefail
STAGE=/tmp/vk_stage
mkdir -p "$STAGE"
for d in .carry/vk1a .carry/vk1b; do [ -d "$d" ] && cp "$d"/vllm_C.so.xz.part* "$STAGE/"; done
if [ -f "$STAGE/vllm_C.so.xz.part00" ] && [ -f "$STAGE/vllm_C.so.xz.part01" ]; then
  cat "$STAGE/vllm_C.so.xz.part00" "$STAGE/vllm_C.so.xz.part01" > "$STAGE/vllm_C.so.xz"
  rm "$STAGE"/vllm_C.so.xz.part0*
  bash "$(ls -d .carry/vk1[ab] | head -1)/device_setup.sh" | grep setup:
else
  echo "vk1: one half staged; carry the other"
fi
