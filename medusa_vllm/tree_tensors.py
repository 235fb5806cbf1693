"""Trees as padded device tensors, stacked so each request can use its own tree.

The engine keeps one :class:`TreeTensors` for all trees it may propose (e.g. the load-adaptive
sizes) and indexes it with a per-request tree id; a request whose drafts vLLM truncated uses the
first ``n`` nodes of its tree (valid because trees are in BFS order).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from medusa_vllm.tree import TokenTree


@dataclass(frozen=True)
class TreeTensors:
    """``NT`` trees padded to ``Q = 1 + max nodes`` query slots (slot 0 is the root)."""

    parents: torch.Tensor  # [NT, Q] int64, root and padding -1
    depths: torch.Tensor  # [NT, Q] int64, padding 0
    ranks: torch.Tensor  # [NT, Q] int64, root and padding -1
    children: torch.Tensor  # [NT, Q, C] int64 node ids ordered by rank, -1 pad
    leaf_paths: torch.Tensor  # [NT, P, D+1] int64 root-to-leaf node ids, -1 pad
    masks: torch.Tensor  # [NT, Q, Q] bool, row i: the nodes query i attends (itself, ancestors)
    num_nodes: torch.Tensor  # [NT] int64
    trees: tuple[TokenTree, ...]

    @property
    def max_nodes(self) -> int:
        return self.parents.shape[1] - 1

    @property
    def max_depth(self) -> int:
        return self.leaf_paths.shape[2] - 1

    @classmethod
    def build(
        cls, trees: Sequence[TokenTree], device: torch.device | str = "cpu", q_max: int | None = None
    ) -> TreeTensors:
        trees = tuple(trees)
        q = max(t.num_nodes for t in trees) + 1
        if q_max is not None:
            if q_max < q:
                raise ValueError(f"q_max {q_max} is smaller than the largest tree ({q} slots)")
            q = q_max
        nt = len(trees)
        c = max(t.children.shape[1] for t in trees)
        p = max(t.leaf_paths.shape[0] for t in trees)
        d = max(t.depth for t in trees)
        parents = torch.full((nt, q), -1, dtype=torch.int64)
        depths = torch.zeros((nt, q), dtype=torch.int64)
        ranks = torch.full((nt, q), -1, dtype=torch.int64)
        children = torch.full((nt, q, c), -1, dtype=torch.int64)
        leaf_paths = torch.full((nt, p, d + 1), -1, dtype=torch.int64)
        masks = torch.zeros((nt, q, q), dtype=torch.bool)
        for k, t in enumerate(trees):
            n = t.num_nodes + 1
            parents[k, :n] = torch.from_numpy(t.parents)
            depths[k, :n] = torch.from_numpy(t.depths)
            ranks[k, :n] = torch.from_numpy(t.ranks)
            children[k, :n, : t.children.shape[1]] = torch.from_numpy(t.children)
            lp = torch.from_numpy(t.leaf_paths)
            leaf_paths[k, : lp.shape[0], : lp.shape[1]] = lp
            masks[k, :n, :n] = torch.from_numpy(t.ancestor_mask)
            # padding rows beyond the tree attend to themselves only (never used for trees)
            masks[k, n:, n:] = torch.eye(q - n, dtype=torch.bool)
        num_nodes = torch.tensor([t.num_nodes for t in trees], dtype=torch.int64)
        dev = torch.device(device)
        return cls(
            parents=parents.to(dev),
            depths=depths.to(dev),
            ranks=ranks.to(dev),
            children=children.to(dev),
            leaf_paths=leaf_paths.to(dev),
            masks=masks.to(dev),
            num_nodes=num_nodes.to(dev),
            trees=trees,
        )


def causal_masks(q: int) -> torch.Tensor:
    """[1, q, q] bool lower-triangular mask: the "tree" of a plain or short causal query."""
    return torch.ones(q, q, dtype=torch.bool).tril_().unsqueeze(0)
