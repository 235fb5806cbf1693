"""GPU side of :mod:`medusa_vllm.vllm_plugin.attention`: one of vLLM's GPU backends with tree
decodes sent to the CUDA kernel (:func:`tree_backend`), registered as vLLM's CUSTOM backend.
vLLM's backend for the rest of a step (prefill chunks) is TRITON_ATTN (:mod:`.attention_triton`,
the default) or FLASH_ATTN (:mod:`.attention_flash`, ``MEDUSA_VLLM_PARENT_ATTENTION=flash``):
both keep vLLM 0.26's packed cache, logical [nb, H, bs, 2D], physical [nb, bs, H, 2D]."""

from __future__ import annotations

import torch
from vllm.v1.attention.backend import AttentionCGSupport

from medusa_vllm.vllm_plugin.attention import MedusaAttnContext, TreeImplMixin, _split_build, tree_capture_shape


def packed_kv_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[nb, H, bs, 2D] (physical [nb, bs, H, 2D]) -> (K, V) [nb, bs, H, D] strided views."""
    x = kv_cache.transpose(1, 2)  # [nb, bs, H, 2D]
    d = x.shape[-1] // 2
    return x[..., :d], x[..., d:]


def tree_backend(parent_backend: type, parent_impl: type, parent_builder: type, label: str, module: str):
    """(backend, impl, builder) classes: vLLM's ``parent_*`` with tree decodes in our kernel,
    named ``Medusa<label>Backend`` etc. in ``module`` (which must bind them under those names:
    vLLM finds the backend by its path, and processes may pickle the classes)."""

    class Builder(parent_builder):
        # uniform decode batches (every request 1 + max tree nodes tokens) run whole in the tree
        # kernel and are captured in FULL graphs; mixed batches (split in two calls) run
        # piecewise, whatever the parent backend supports for them
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

    class Impl(TreeImplMixin, parent_impl):
        kv_views = staticmethod(packed_kv_views)

    class Backend(parent_backend):
        kv_views = staticmethod(packed_kv_views)

        @staticmethod
        def get_name() -> str:
            return "CUSTOM"

        @staticmethod
        def get_impl_cls():
            return Impl

        @staticmethod
        def get_builder_cls():
            return Builder

    for cls, kind in ((Builder, "MetadataBuilder"), (Impl, "Impl"), (Backend, "Backend")):
        cls.__name__ = cls.__qualname__ = f"Medusa{label}{kind}"
        cls.__module__ = module
    return Backend, Impl, Builder
