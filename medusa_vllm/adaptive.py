"""Load-adaptive tree size: big trees when the batch is small, smaller ones as it grows.

A verification step costs about as much as a plain decode step while the batch's query tokens
stay below the point where the forward pass turns compute-bound; past it, every extra tree node
is paid in full. The policy picks, per step, the largest tree whose tokens (requests × (1 + nodes))
fit a token budget — that knee — and falls back to the smallest tree (a short chain) beyond it.
The budget comes from the speculative config (``adaptive_max_tokens``) or a per-device default
measured with ``benchmarks/step_cost.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

from medusa_vllm.tree import TokenTree

# tokens per step below which a forward pass costs about the same (measured: see README)
DEFAULT_TOKEN_BUDGET = {"cuda": 512, "cpu": 32}


class AdaptiveTreePolicy:
    def __init__(self, trees: Sequence[TokenTree], enabled: bool, budget: int, device: str) -> None:
        self.sizes = [len(t) for t in trees]
        self.enabled = enabled and len(trees) > 1
        self.budget = budget or DEFAULT_TOKEN_BUDGET.get(device, 512)
        # candidates from the largest tree to the smallest
        self.order = sorted(range(len(trees)), key=lambda k: -self.sizes[k])

    def choose(self, num_reqs: int) -> int:
        """Index of the tree to propose for a step with ``num_reqs`` running requests."""
        if not self.enabled:
            return 0
        for k in self.order:
            if num_reqs * (1 + self.sizes[k]) <= self.budget:
                return k
        return self.order[-1]
