#!/usr/bin/env bash
# GPU machine, repository root, in a call carrying .carry/fa3 (tools/gpu/pack_fa3.sh), after the
# kit's Python tree is staged (the vk2b call): installs vLLM's FlashAttention 3 binary beside its
# Python files and checks that vLLM sees it (FLASH_ATTN then runs; the kit's patched
# vllm_flash_attn/__init__.py warned instead of raising without it).
set -euo pipefail
SITE=${SITE_DIR:-/tmp/site}
DEST="$SITE/vllm/vllm_flash_attn"
[ -d "$DEST" ] || { echo "fa3: $DEST missing: stage vk2, vk3 and vk2b first"; exit 1; }
xz -dc .carry/fa3/_vllm_fa3_C.abi3.so.xz > "$DEST/_vllm_fa3_C.abi3.so"
(cd "$DEST" && sha256sum -c --quiet "$OLDPWD/.carry/fa3/_vllm_fa3_C.abi3.so.sha256")
PYTHONPATH="$SITE" python3 -c "
from vllm.vllm_flash_attn.flash_attn_interface import FA3_AVAILABLE, is_fa_version_supported
print('fa3: available', FA3_AVAILABLE, 'supported here', is_fa_version_supported(3))
" 2>&1 | grep -a "^fa3:"
