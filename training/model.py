"""The module that trains: a transformers causal LM (the base) + MedusaHeads + the fused loss.

Label columns (training.dataset.label_offsets): [base (t+1),] head 0 (t+2), ..., head K-1 (t+K+1).
The base column is present in Medusa-2 training and in evaluation; its loss weight is
`base_loss_weight`, head k's is `heads_coefficient * head_decay**k`. All columns that share a
vocab projection (the base lm_head, reused by heads with own_lm_heads=False) go through one
fused linear + cross-entropy call.

Everything runs inside `forward` so that DDP and FSDP see one module call per step. Training
computes heads and logits in the compute dtype (bf16 autocast on GPU); evaluation (no grad) in the
heads' dtype and fp32 logits, so that bf16 ties do not count as top-k hits.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from medusa_vllm.heads import MedusaHeads, MedusaHeadsConfig
from training.dataset import IGNORE
from training.fused_ce import FusedCEOutput, fused_linear_cross_entropy


@dataclass(frozen=True)
class LossConfig:
    head_decay: float = 0.8  # head k's weight is heads_coefficient * head_decay**k
    heads_coefficient: float = 1.0
    base_loss_weight: float = 0.0  # Medusa-2: the base LM loss keeps this weight
    chunk_size: int | None = None  # fused CE rows per chunk (None: by vocab size)
    backend: str = "chunked"  # fused CE backend: chunked | liger | auto


class StepOutput(NamedTuple):  # a tuple: DDP and FSDP hook the tensors of forward outputs
    loss: Tensor  # [] float32 (differentiable in training)
    group_loss: Tensor  # [G] mean CE per label column
    correct: Tensor  # [G, topk] top-(j+1) hits per label column
    num_valid: Tensor  # [G] targets per label column
    positions: Tensor  # [] int64 positions with at least one target


class MedusaTrainModel(nn.Module):
    def __init__(self, base: nn.Module, heads: MedusaHeads, loss: LossConfig,
                 compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.base, self.heads, self.loss_cfg, self.compute_dtype = base, heads, loss, compute_dtype

    @property
    def num_heads(self) -> int:
        return self.heads.num_heads

    def lm_head_weight(self) -> Tensor:  # [V, H]
        return self.base.get_output_embeddings().weight

    def _autocast(self, device: torch.device):
        if self.compute_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.compute_dtype)

    def base_hidden(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids, attention_mask [B, T] -> final-norm hidden states [B, T, H]."""
        with self._autocast(input_ids.device):
            out = self.base.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state

    def forward(self, *, labels: Tensor | None = None, input_ids: Tensor | None = None,
                attention_mask: Tensor | None = None, hidden: Tensor | None = None,
                train_base: bool = False, topk: int = 1, mode: str = "loss") -> StepOutput | Tensor:
        """Sequence batch (input_ids, attention_mask [B, T], labels [B, T, G]) or cached rows
        (hidden [N, H], labels [N, G]). mode="hidden" returns the base hidden states [B, T, H]
        (no grad; how hidden-state caches are built, through the FSDP root when sharded)."""
        if mode == "hidden":
            with torch.no_grad():
                return self.base_hidden(input_ids, attention_mask)
        if hidden is None:
            with torch.set_grad_enabled(train_base and torch.is_grad_enabled()):
                hidden = self.base_hidden(input_ids, attention_mask)  # [B, T, H]
            keep = (labels != IGNORE).any(-1)  # [B, T]
            hidden, labels = hidden[keep], labels[keep]  # [N, H], [N, G]
        training = torch.is_grad_enabled()
        if training:
            with self._autocast(hidden.device):
                head_hidden = self.heads(hidden)  # [N, K, H]
        else:  # evaluation: heads and logits in the heads' dtype / fp32 (no bf16 logit ties)
            head_hidden = self.heads(hidden.to(next(self.heads.parameters()).dtype))
        weight = self.lm_head_weight()
        if not (train_base and training):
            weight, hidden = weight.detach(), hidden.detach()
        out = self._loss(hidden, head_hidden, weight, labels, topk,
                         self.compute_dtype if training else torch.float32)
        return StepOutput(out.loss, out.group_loss, out.correct, out.num_valid,
                          torch.tensor(labels.shape[0], device=labels.device))

    def _loss(self, hidden: Tensor, head_hidden: Tensor, weight: Tensor, labels: Tensor,
              topk: int, cd: torch.dtype) -> FusedCEOutput:
        K, cfg = self.num_heads, self.loss_cfg
        with_base = labels.shape[-1] == K + 1
        if labels.shape[-1] not in (K, K + 1):
            raise ValueError(f"labels have {labels.shape[-1]} columns; expected {K} heads (+1 base)")
        head_w = [cfg.heads_coefficient * cfg.head_decay ** k for k in range(K)]
        weights = ([cfg.base_loss_weight] if with_base else []) + head_w
        ce = dict(chunk_size=cfg.chunk_size, topk=topk, backend=cfg.backend)
        if self.heads.lm_heads is None:  # one projection for every column
            rows = head_hidden.to(cd)
            if with_base:
                rows = torch.cat([hidden.to(cd).unsqueeze(1), rows], dim=1)  # [N, K+1, H]
            return fused_linear_cross_entropy(rows, weight.to(cd), labels, group_weights=weights, **ce)
        parts = []  # own lm heads: one call per projection
        if with_base:
            parts.append(fused_linear_cross_entropy(hidden.to(cd), weight.to(cd), labels[:, 0],
                                                    group_weights=weights[:1], **ce))
        for k, lm_head in enumerate(self.heads.lm_heads):
            col = k + int(with_base)
            parts.append(fused_linear_cross_entropy(head_hidden[:, k].to(cd), lm_head.weight.to(cd),
                                                    labels[:, col], group_weights=[weights[col]], **ce))
        return FusedCEOutput(sum(p.loss for p in parts), torch.cat([p.group_loss for p in parts]),
                             torch.cat([p.correct for p in parts]), torch.cat([p.num_valid for p in parts]))


def load_base(model_dir: str, *, dtype: torch.dtype, device: torch.device, trainable: bool,
              gradient_checkpointing: bool = False) -> nn.Module:
    """The base causal LM: frozen in `dtype` (Medusa-1) or trainable fp32 master weights (Medusa-2,
    computed in `dtype` under autocast)."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32 if trainable else dtype)
    base.to(device)
    base.requires_grad_(trainable)
    if trainable:
        base.train()
        if gradient_checkpointing:
            kwargs = {"use_reentrant": False}
            if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x
                base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        base.eval()
    return base


def new_heads(base: nn.Module, model_dir: str, num_heads: int, num_layers: int,
              own_lm_heads: bool, device: torch.device) -> MedusaHeads:
    """Fresh fp32 heads for `base` (ResBlocks zero-initialised; own lm heads copy the base's)."""
    weight = base.get_output_embeddings().weight  # [V, H]
    cfg = MedusaHeadsConfig(hidden_size=weight.shape[1], vocab_size=weight.shape[0],
                            num_heads=num_heads, num_layers=num_layers, own_lm_heads=own_lm_heads,
                            base_model=str(model_dir))
    heads = MedusaHeads(cfg).to(device)
    if own_lm_heads:
        heads.init_lm_heads_(weight.detach().float())
    return heads
