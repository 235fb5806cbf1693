"""GPU side of :mod:`medusa_vllm.vllm_plugin.attention`: vLLM's TRITON_ATTN backend with tree
decodes sent to the CUDA kernel. Registered as vLLM's CUSTOM attention backend."""

from __future__ import annotations

import torch
from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadataBuilder,
)

from medusa_vllm.vllm_plugin.attention import (
    MedusaAttnContext,
    TreeImplMixin,
    _split_build,
)


def triton_kv_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = kv_cache.transpose(1, 2)  # [nb, bs, H, 2D]
    d = x.shape[-1] // 2
    return x[..., :d], x[..., d:]


class MedusaTritonMetadataBuilder(TritonAttentionMetadataBuilder):
    # mixed batches split into two calls; uniform tree-decode batches run in FULL graphs
    # only once the tree step is graph-safe (see runner); until then piecewise.
    _cudagraph_support = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.medusa: MedusaAttnContext | None = None
        self.reorder_batch_threshold = 1 + vllm_config.speculative_config.num_speculative_tokens

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        return _split_build(self, super().build, common_prefix_len, common_attn_metadata, fast_build)


class MedusaTritonImpl(TreeImplMixin, TritonAttentionImpl):
    kv_views = staticmethod(triton_kv_views)


class MedusaTritonBackend(TritonAttentionBackend):
    kv_views = staticmethod(triton_kv_views)

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls():
        return MedusaTritonImpl

    @staticmethod
    def get_builder_cls():
        return MedusaTritonMetadataBuilder
