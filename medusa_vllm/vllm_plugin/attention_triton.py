"""vLLM's TRITON_ATTN backend with tree decodes sent to the CUDA kernel (the default parent of
medusa_vllm's CUSTOM backend; :mod:`.attention_gpu`)."""

from __future__ import annotations

from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadataBuilder,
)

from medusa_vllm.vllm_plugin.attention_gpu import tree_backend

MedusaTritonBackend, MedusaTritonImpl, MedusaTritonMetadataBuilder = tree_backend(
    TritonAttentionBackend, TritonAttentionImpl, TritonAttentionMetadataBuilder, "Triton", __name__)
