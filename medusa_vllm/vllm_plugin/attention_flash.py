"""vLLM's FLASH_ATTN backend with tree decodes sent to the CUDA kernel: the parent of medusa_vllm's
CUSTOM backend with ``MEDUSA_VLLM_PARENT_ATTENTION=flash`` (:mod:`.attention_gpu`). A step's
prefill chunks then run FlashAttention, as they do in vLLM without speculation on a GPU that has
it, instead of Triton's kernels (whose host time per layer dominated the steps that carry a
prefill: ``benchmarks/results/mixed_profile_h100_sampled_21efb5d.json``)."""

from __future__ import annotations

from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadataBuilder,
)

from medusa_vllm.vllm_plugin.attention_gpu import tree_backend

MedusaFlashBackend, MedusaFlashImpl, MedusaFlashMetadataBuilder = tree_backend(
    FlashAttentionBackend, FlashAttentionImpl, FlashAttentionMetadataBuilder, "Flash", __name__)
