"""The object vLLM's ``custom_class`` method instantiates: it owns the Medusa heads.

vLLM builds it in the model runner's ``__init__`` and calls ``load_model(target)`` after the
target model is loaded. Drafting itself is done by the medusa_vllm runner on the device
(``head_topk``), so vLLM's host-side ``propose`` hook is never used.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.logger import init_logger

from medusa_vllm.checkpoint import load_heads
from medusa_vllm.heads import MedusaHeads
from medusa_vllm.vllm_plugin.config import MedusaSpecConfig

logger = init_logger(__name__)


class MedusaTreeProposer:
    def __init__(self, vllm_config: VllmConfig) -> None:
        self.cfg = MedusaSpecConfig.from_dict(vllm_config.additional_config["medusa_vllm"])
        self.device = vllm_config.device_config.device
        self.dtype = vllm_config.model_config.dtype
        self.hidden_size = vllm_config.model_config.get_hidden_size()
        self.vocab_size = vllm_config.model_config.get_vocab_size()
        self.heads: MedusaHeads | None = None
        self.target: nn.Module | None = None

    def load_model(self, target_model: nn.Module) -> None:
        self.heads = load_heads(
            self.cfg.heads,
            hidden_size=self.hidden_size,
            vocab_size=self.vocab_size,
            device=self.device,
            dtype=self.dtype,
        ).eval()
        self.target = target_model
        logger.info(
            "medusa_vllm: loaded %d heads from %s (tree of %d nodes, %s acceptance)",
            self.heads.config.num_heads,
            self.cfg.heads,
            len(self.cfg.tree),
            self.cfg.acceptance,
        )

    def propose(self, *args, **kwargs):  # vLLM's host-side hook: unused by our runner
        raise RuntimeError("medusa_vllm drafts on the device in its model runner")

    @torch.inference_mode()
    def head_topk(self, hidden: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [B, H] (final-norm state of each request's last token) ->
        (top-k token ids [B, K, topk] int64, finite [B] bool: all head logits finite)."""
        assert self.heads is not None and self.target is not None, "load_model() first"
        b = hidden.shape[0]
        h = self.heads(hidden.to(self.dtype))  # [B, K, H]
        k = h.shape[1]
        if self.heads.config.own_lm_heads:
            logits = self.heads.logits(hidden.to(self.dtype))  # [B, K, V]
        else:
            logits = self.target.compute_logits(h.reshape(b * k, -1)).view(b, k, -1)
        finite = torch.isfinite(logits).all(dim=2).all(dim=1)  # [B]
        ids = logits.topk(topk, dim=-1).indices  # [B, K, topk]
        return ids, finite
