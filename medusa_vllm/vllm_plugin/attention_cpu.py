"""CPU side of :mod:`medusa_vllm.vllm_plugin.attention`: vLLM's CPU_ATTN backend with tree
decodes sent to the C++ kernel."""

from __future__ import annotations

import torch
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)

from medusa_vllm.vllm_plugin.attention import (
    MedusaAttnContext,
    TreeImplMixin,
    _split_build,
)


def cpu_kv_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU_ATTN's "vec"/"vec16" layout: per (block, kv head), K is stored transposed
    ([D, bs]: element (t, d) at d * bs + t) and V row-major ([bs, D]), one after the other.
    Returned as [nb, bs, H, D] strided views (K's head_dim stride is bs)."""
    nb, h, bs, d2 = kv_cache.shape
    d = d2 // 2
    x = kv_cache.view(nb, h, 2 * bs * d)
    k = x[:, :, : bs * d].view(nb, h, d, bs).permute(0, 3, 1, 2)
    v = x[:, :, bs * d :].view(nb, h, bs, d).permute(0, 2, 1, 3)
    return k, v


def _no_amx(isa: str) -> str:
    # AMX packs K/V differently; "vec" keeps the layout cpu_kv_views documents
    return "vec" if isa == "amx" else isa


class MedusaCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.isa = _no_amx(self.isa)
        self.medusa: MedusaAttnContext | None = None
        self.reorder_batch_threshold = 1 + vllm_config.speculative_config.num_speculative_tokens

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        return _split_build(self, super().build, common_prefix_len, common_attn_metadata, fast_build)


class MedusaCPUImpl(TreeImplMixin, CPUAttentionBackendImpl):
    kv_views = staticmethod(cpu_kv_views)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.isa = _no_amx(self.isa)


class MedusaCPUBackend(CPUAttentionBackend):
    kv_views = staticmethod(cpu_kv_views)

    @staticmethod
    def get_impl_cls():
        return MedusaCPUImpl

    @staticmethod
    def get_builder_cls():
        return MedusaCPUMetadataBuilder


def use_cpu_tree_attention() -> None:
    """The CPU platform always selects CPU_ATTN: point that entry at our backend."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(
        AttentionBackendEnum.CPU_ATTN, "medusa_vllm.vllm_plugin.attention_cpu.MedusaCPUBackend"
    )
