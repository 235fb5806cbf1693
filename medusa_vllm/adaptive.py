"""Load-adaptive tree size: big trees when the batch is small, smaller ones as it grows, none
when even the smallest would cost more than it returns.

A verification step costs about as much as a plain decode step while the batch's query tokens
stay below the point where the forward pass turns compute-bound; past it, every extra tree node
is paid in full. The policy picks, per step, the largest tree whose tokens (requests × (1 + nodes))
fit a token budget — that knee — and proposes no drafts beyond it (the step is a plain decode).
The budget comes from the speculative config (``adaptive_max_tokens``) or a per-device default
measured with ``benchmarks/step_cost.py``.

The same choice, as a batch-size schedule of draft counts (:meth:`AdaptiveTreePolicy.schedule`),
is handed to vLLM's dynamic speculative decoding (``num_speculative_tokens_per_batch_size``), so
that under asynchronous scheduling the scheduler reserves as many draft slots as the tree the
runner will propose has nodes.
"""

from __future__ import annotations

from collections.abc import Sequence

from medusa_vllm.tree import TokenTree

# tokens per step below which a forward pass costs about the same (measured: see README)
DEFAULT_TOKEN_BUDGET = {"cuda": 512, "cpu": 32}
NO_TREE = -1  # choose(): no drafts this step
# vLLM clips the schedule's last range to its max_num_seqs
_OPEN_END = 1 << 20


class AdaptiveTreePolicy:
    def __init__(self, trees: Sequence[TokenTree], enabled: bool, budget: int, device: str) -> None:
        self.sizes = [len(t) for t in trees]
        self.enabled = enabled and len(trees) > 1
        self.budget = budget or DEFAULT_TOKEN_BUDGET.get(device, 512)
        # candidates from the largest tree to the smallest (one per size: a draft count names it)
        order = sorted(range(len(trees)), key=lambda k: -self.sizes[k])
        self.order = [k for i, k in enumerate(order) if i == 0 or self.sizes[k] != self.sizes[order[i - 1]]]

    def choose(self, num_reqs: int) -> int:
        """Index of the tree to propose for a step with ``num_reqs`` running requests, or
        NO_TREE when even the smallest tree's tokens exceed the budget."""
        if not self.enabled:
            return 0
        for k in self.order:
            if num_reqs * (1 + self.sizes[k]) <= self.budget:
                return k
        return NO_TREE

    def num_drafts(self, num_reqs: int) -> int:
        k = self.choose(num_reqs)
        return 0 if k == NO_TREE else self.sizes[k]

    def tree_of_num_drafts(self, n: int) -> int:
        """The tree a draft count stands for (NO_TREE for 0)."""
        if n == 0:
            return NO_TREE
        for k in self.order:
            if self.sizes[k] == n:
                return k
        raise ValueError(f"medusa_vllm: no tree of the adaptive policy has {n} nodes ({self.sizes})")

    def schedule(self, max_batch: int) -> list[tuple[int, int, int]]:
        """``[(first batch size, last batch size, drafts), ...]`` for batch sizes 1..max_batch
        (the last range left open), vLLM's ``num_speculative_tokens_per_batch_size`` format."""
        out: list[tuple[int, int, int]] = []
        for b in range(1, max_batch + 1):
            n = self.num_drafts(b)
            if out and out[-1][2] == n:
                out[-1] = (out[-1][0], b, n)
            else:
                out.append((b, b, n))
        out[-1] = (out[-1][0], _OPEN_END, out[-1][2])
        return out
