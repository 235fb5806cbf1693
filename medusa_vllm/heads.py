"""Medusa heads: K small residual MLPs on the base model's last hidden state (pure torch, no vLLM).

Head k (0-based) applied to the base model's final-norm hidden state of token t predicts token
t+k+2; the base model's own lm_head predicts t+1. Each head is `num_layers` ResBlocks
(x + SiLU(W x + b), zero-initialised so an untrained head returns its input) followed by a vocab
projection: the base model's lm_head (shared, the default: a checkpoint of a few MB) or a
per-head `nn.Linear(H, V)` (`own_lm_heads`, the FasterDecoding/Medusa layout).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class MedusaHeadsConfig:
    hidden_size: int  # H: the base model's hidden size
    vocab_size: int  # V: the base model's vocabulary size
    num_heads: int = 4  # K: head k predicts token t+k+2
    num_layers: int = 1  # ResBlocks per head
    own_lm_heads: bool = False  # False: heads reuse the base model's lm_head
    bias: bool = True  # ResBlock Linear has a bias (FasterDecoding layout does)
    base_model: str | None = None  # provenance (name or path of the base model)
    tree: list[list[int]] | None = None  # recommended tree (Medusa "choices"), paths of child ranks
    head_accuracies: list[list[float]] | None = None  # [K][k] top-(k+1) accuracy, k = 0..9

    def __post_init__(self) -> None:
        for name in ("hidden_size", "vocab_size", "num_heads", "num_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"MedusaHeadsConfig.{name} must be a positive int, got {value!r}")
        for name in ("own_lm_heads", "bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MedusaHeadsConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.base_model is not None and not isinstance(self.base_model, str):
            raise ValueError(f"MedusaHeadsConfig.base_model must be a str or None, got {self.base_model!r}")
        if self.tree is not None:
            self.tree = [list(path) for path in self.tree]
            self._check_tree()
        if self.head_accuracies is not None:
            self.head_accuracies = [[float(a) for a in accs] for accs in self.head_accuracies]
            self._check_head_accuracies()

    def _check_tree(self) -> None:
        for path in self.tree:
            if not path or len(path) > self.num_heads:
                raise ValueError(
                    f"MedusaHeadsConfig.tree: path {path} must have 1..num_heads={self.num_heads} "
                    "entries (depth d uses head d-1)")
            if any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in path):
                raise ValueError(f"MedusaHeadsConfig.tree: path {path} must hold non-negative ints")

    def _check_head_accuracies(self) -> None:
        if len(self.head_accuracies) != self.num_heads:
            raise ValueError(
                f"MedusaHeadsConfig.head_accuracies has {len(self.head_accuracies)} rows, "
                f"expected one per head ({self.num_heads})")
        for accs in self.head_accuracies:
            if any(not (0.0 <= a <= 1.0) or math.isnan(a) for a in accs):
                raise ValueError(f"MedusaHeadsConfig.head_accuracies: {accs} must lie in [0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MedusaHeadsConfig:
        """Strict: unknown keys raise ValueError (a typo must not silently fall back to a default)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MedusaHeadsConfig fields {unknown}")
        return cls(**data)


class ResBlock(nn.Module):
    """x + SiLU(W x + b) with W, b zero-initialised: an untrained block is the identity."""

    def __init__(self, hidden_size: int, bias: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size, bias=bias)  # weight [H, H], bias [H]
        nn.init.zeros_(self.linear.weight)
        if bias:
            nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor) -> Tensor:  # [..., H] -> [..., H]
        return x + F.silu(self.linear(x))


class MedusaHeads(nn.Module):
    """K Medusa heads. State dict keys: `blocks.{h}.{l}.linear.weight|bias`, `lm_heads.{h}.weight`."""

    def __init__(self, config: MedusaHeadsConfig) -> None:
        super().__init__()
        self.config = config
        H, V = config.hidden_size, config.vocab_size
        # [K] of Sequential([L] ResBlocks); every block is a distinct module (FasterDecoding's
        # `[ResBlock] * L` shares one module across layers; that is not reproduced here).
        self.blocks = nn.ModuleList(
            nn.Sequential(*(ResBlock(H, config.bias) for _ in range(config.num_layers)))
            for _ in range(config.num_heads))
        # [K] of Linear(H -> V) (weight [V, H]) when own_lm_heads, else the base lm_head is used.
        self.lm_heads: nn.ModuleList | None = None
        if config.own_lm_heads:
            self.lm_heads = nn.ModuleList(
                nn.Linear(H, V, bias=False) for _ in range(config.num_heads))

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    @torch.no_grad()
    def init_lm_heads_(self, lm_head_weight: Tensor) -> None:
        """Copy the base lm_head ([V, H]) into every own lm head (Medusa's training init)."""
        if self.lm_heads is None:
            raise ValueError("init_lm_heads_: these heads share the base lm_head (own_lm_heads=False)")
        self._check_lm_head_weight(lm_head_weight)
        for lm_head in self.lm_heads:
            lm_head.weight.copy_(lm_head_weight)

    def forward(self, hidden: Tensor) -> Tensor:
        """hidden [N, H] (any leading dims) -> per-head hidden states [N, K, H]."""
        if hidden.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"MedusaHeads: hidden states have size {hidden.shape[-1]} in the last dim, "
                f"expected hidden_size={self.config.hidden_size}")
        return torch.stack([block(hidden) for block in self.blocks], dim=-2)  # [N, K, H]

    def logits(self, hidden: Tensor, lm_head_weight: Tensor | None = None) -> Tensor:
        """hidden [N, H] -> logits [N, K, V]; head k's row predicts token t+k+2.

        lm_head_weight [V, H] (the base model's lm_head) is required when the heads share it
        (own_lm_heads=False) and ignored when they have their own.
        """
        head_hidden = self(hidden)  # [N, K, H]
        if self.lm_heads is not None:
            return torch.stack(
                [lm_head(head_hidden[..., k, :]) for k, lm_head in enumerate(self.lm_heads)],
                dim=-2)  # [N, K, V]
        if lm_head_weight is None:
            raise ValueError(
                "MedusaHeads.logits: these heads share the base model's lm_head "
                "(own_lm_heads=False); pass lm_head_weight [V, H]")
        self._check_lm_head_weight(lm_head_weight)
        return F.linear(head_hidden, lm_head_weight)  # [N, K, V]

    def _check_lm_head_weight(self, weight: Tensor) -> None:
        expected = (self.config.vocab_size, self.config.hidden_size)
        if tuple(weight.shape) != expected:
            raise ValueError(
                f"MedusaHeads: lm_head_weight has shape {tuple(weight.shape)}, expected "
                f"[vocab_size, hidden_size] = {list(expected)}")
