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
    tree_capture_shape,
)


def triton_kv_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = kv_cache.transpose(1, 2)  # [nb, bs, H, 2D]
    d = x.shape[-1] // 2
    return x[..., :d], x[..., d:]


class MedusaTritonMetadataBuilder(TritonAttentionMetadataBuilder):
    # uniform decode batches (every request 1 + max tree nodes tokens) run whole in the tree
    # kernel and are captured in FULL graphs; mixed batches (split in two calls) run piecewise
    _cudagraph_support = AttentionCGSupport.UNIFORM_BATCH

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.medusa: MedusaAttnContext | None = None
        self.reorder_batch_threshold = 1 + vllm_config.speculative_config.num_speculative_tokens

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        return _split_build(self, super().build, common_prefix_len, common_attn_metadata, fast_build)

    def build_for_cudagraph_capture(self, common_attn_metadata):
        step = self.medusa.step if self.medusa is not None else None
        if step is None or not step.all_reqs or (
                step.uniform_only and not tree_capture_shape(common_attn_metadata, self.medusa.masks.shape[1])):
            return super().build_for_cudagraph_capture(common_attn_metadata)
        # a tree-step graph: the dummy's seq_lens (= its query length) are valid tree-kernel
        # inputs; vLLM's Triton override would set them to 1, below the query length
        return self.build(0, common_attn_metadata)


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
