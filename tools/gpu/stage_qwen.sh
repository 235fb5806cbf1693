#!/usr/bin/env bash
# GPU machine, repository root, in every call that carries a .carry/qwN chunk (tools/gpu/pack_qwen.sh):
# stages it in /tmp; once every chunk is there and the vLLM kit's wheels are installed (gguf),
# rebuilds the GGUF, checks its sha256 and converts it to a bf16 Hugging Face folder /tmp/qwen_hf.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/chunks.sh"
STAGE=/tmp/qwen_stage
DEST=${QWEN_DIR:-/tmp/qwen_hf}
read -r have n < <(gather_chunks qw "$STAGE")
if [ -f "$DEST/.ok" ]; then
  echo "qwen: done ($DEST)"
elif [ "$n" -gt 0 ] && [ "$have" -eq "$n" ] && [ -f /tmp/site/.ok_wheels ]; then
  cat "$STAGE"/qwen.gz.part* | gunzip > "$STAGE/qwen.gguf"
  (cd "$STAGE" && sha256sum -c qwen.gguf.sha256)
  PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} python3 /tmp/vk_stage/convert_gguf.py "$STAGE/qwen.gguf" "$DEST"
  rm -f "$STAGE/qwen.gguf" && touch "$DEST/.ok" && echo "qwen: done ($DEST)"
else
  echo "qwen: have $have/$n chunks; wheels installed: $([ -f /tmp/site/.ok_wheels ] && echo yes || echo no)"
fi
