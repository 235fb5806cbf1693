"""vLLM's TRITON_ATTN backend with tree decodes sent to the CUDA kernel (the default parent of
medusa_vllm's CUSTOM backend; :mod:`.attention_gpu`)."""

from __future__ import annotations

from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadataBuilder,
)

from medusa_vllm.vllm_plugin.attention_gpu import packed_kv_views, tree_backend

triton_kv_views = packed_kv_views
MedusaTritonBackend, MedusaTritonImpl, MedusaTritonMetadataBuilder = tree_backend(
    TritonAttentionBackend, TritonAttentionImpl, TritonAttentionMetadataBuilder, "Triton", __name__)
