#!/usr/bin/env bash
# CPU machine, repository root, after bash ../shared/device/pack.sh: the kit's vk1 chunk (55 MB)
# plus this repository's tracked files (the Qwen heads among them) no longer fit one device call
# (64 MiB), so vk1's file travels as two chunk folders, .carry/vk1a and .carry/vk1b, each with
# the kit's scripts. On the device: bash tools/gpu/stage_vk1.sh in the call carrying each.
# vk2 (GGUF half + vLLM's Python tree, 52 MB) no longer fits beside the tree either (2026-12-05):
# its vllm_py.tar.xz moves to .carry/vk2b, carried with vk4 (the kit's set-up stages every
# .carry/vk*/ folder a call brings).
set -euo pipefail
C=.carry
[ -f "$C/vk1/vllm_C.so.xz" ] || { echo "no $C/vk1/vllm_C.so.xz: run ../shared/device/pack.sh first"; exit 1; }
rm -rf "$C/vk1a" "$C/vk1b" && mkdir -p "$C/vk1a" "$C/vk1b"
cp "$C"/vk1/*.sh "$C"/vk1/*.py "$C/vk1a/" && cp "$C"/vk1/*.sh "$C"/vk1/*.py "$C/vk1b/"
split -n 2 -d "$C/vk1/vllm_C.so.xz" "$C/vk1a/vllm_C.so.xz.part"
mv "$C/vk1a/vllm_C.so.xz.part01" "$C/vk1b/"
cat "$C/vk1a/vllm_C.so.xz.part00" "$C/vk1b/vllm_C.so.xz.part01" | cmp - "$C/vk1/vllm_C.so.xz"
rm -rf "$C/vk1" && du -sh "$C/vk1a" "$C/vk1b"
if [ -f "$C/vk2/vllm_py.tar.xz" ]; then
  mkdir -p "$C/vk2b" && cp "$C"/vk2/device_setup.sh "$C"/vk2/convert_gguf.py "$C/vk2b/"
  mv "$C/vk2/vllm_py.tar.xz" "$C/vk2b/" && du -sh "$C/vk2" "$C/vk2b"
fi
