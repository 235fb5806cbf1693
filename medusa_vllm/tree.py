"""Sparse token trees for Medusa.

A tree is given as Medusa "choices": each node is the path of top-k ranks that leads to it from
the root, e.g. ``(0, 1)`` is "the 2nd candidate of head 1 under the 1st candidate of head 0".
The root (node 0) is the last token the target model emitted; node ``i`` (1-based) at depth ``d``
holds the candidate of rank ``path[-1]`` of head ``d - 1``. Medusa heads do not condition on the
parent token, so a node's token depends only on its depth and rank.

Nodes are flattened in BFS order, sorted by ``(len(path), path)``: every parent comes before its
children, so any prefix of the node list is itself a valid tree. vLLM truncates speculative
tokens to a prefix under its token budget; the truncated tree stays valid.

Everything here is plain Python/NumPy (no torch, no vLLM); :func:`TreeStack` turns trees into
the padded tensors the engine indexes on the device.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from medusa_vllm.tree_presets import PRESETS

Path = tuple[int, ...]


@dataclass(frozen=True)
class TokenTree:
    """A validated tree in BFS order, with the index buffers the engine needs.

    Node 0 is the root; node ``i >= 1`` is ``paths[i - 1]``.
    """

    paths: tuple[Path, ...]
    num_nodes: int = field(init=False)  # T (the root not counted)
    depth: int = field(init=False)  # deepest node's depth (0 for the empty tree)
    parents: np.ndarray = field(init=False, repr=False)  # [T+1] int64, root -1
    depths: np.ndarray = field(init=False, repr=False)  # [T+1] int64, root 0
    ranks: np.ndarray = field(init=False, repr=False)  # [T+1] int64, top-k rank; root -1
    ancestor_mask: np.ndarray = field(init=False, repr=False)  # [T+1, T+1] bool, i sees j
    leaf_paths: np.ndarray = field(init=False, repr=False)  # [P, depth+1] node ids, -1 pad
    children: np.ndarray = field(init=False, repr=False)  # [T+1, C] node ids by rank, -1 pad

    def __post_init__(self) -> None:
        paths = self.paths
        index = {p: i + 1 for i, p in enumerate(paths)}
        num = len(paths) + 1
        parents = np.full(num, -1, dtype=np.int64)
        depths = np.zeros(num, dtype=np.int64)
        ranks = np.full(num, -1, dtype=np.int64)
        mask = np.eye(num, dtype=bool)
        kids: list[list[int]] = [[] for _ in range(num)]
        for i, p in enumerate(paths, start=1):
            parent = index.get(p[:-1], 0)
            parents[i], depths[i], ranks[i] = parent, len(p), p[-1]
            mask[i] = mask[parent]
            mask[i, i] = True
            kids[parent].append(i)
        is_leaf = np.array([not k for k in kids])
        depth = int(depths.max())
        leaf_paths = np.full((int(is_leaf.sum()), depth + 1), -1, dtype=np.int64)
        for row, leaf in enumerate(np.flatnonzero(is_leaf)):
            chain = [int(leaf)]
            while parents[chain[-1]] >= 0:
                chain.append(int(parents[chain[-1]]))
            leaf_paths[row, : len(chain)] = chain[::-1]
        width = max(len(k) for k in kids)
        children = np.full((num, max(width, 1)), -1, dtype=np.int64)
        for i, k in enumerate(kids):
            children[i, : len(k)] = sorted(k, key=lambda c: ranks[c])
        for name, value in [
            ("num_nodes", num - 1),
            ("depth", depth),
            ("parents", parents),
            ("depths", depths),
            ("ranks", ranks),
            ("ancestor_mask", mask),
            ("leaf_paths", leaf_paths),
            ("children", children),
        ]:
            object.__setattr__(self, name, value)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_choices(
        cls,
        choices: Iterable[Sequence[int]],
        *,
        num_heads: int | None = None,
        topk: int | None = None,
        allow_empty: bool = False,
    ) -> TokenTree:
        """Validate Medusa choices and sort them into BFS order.

        ``num_heads`` bounds the depth and ``topk`` bounds every rank, when given.
        Raises ValueError naming the first bad path.
        """
        paths = [_as_path(c) for c in choices]
        if not paths and not allow_empty:
            raise ValueError("token tree is empty: give at least one path, e.g. [[0]]")
        seen: set[Path] = set()
        for p in paths:
            if p in seen:
                raise ValueError(f"token tree: duplicate path {list(p)}")
            seen.add(p)
        for p in paths:
            if topk is not None and max(p) >= topk:
                raise ValueError(
                    f"token tree: path {list(p)} asks for candidate rank {max(p)}, but "
                    f"only the top {topk} candidates of each head are taken"
                )
            if num_heads is not None and len(p) > num_heads:
                raise ValueError(
                    f"token tree: path {list(p)} has depth {len(p)}, but there are only "
                    f"{num_heads} Medusa heads"
                )
            if len(p) > 1 and p[:-1] not in seen:
                raise ValueError(
                    f"token tree: path {list(p)} has no parent: add {list(p[:-1])} to the tree"
                )
        return cls(tuple(sorted(paths, key=lambda p: (len(p), p))))

    @classmethod
    def chain(cls, length: int) -> TokenTree:
        """Top-1 chain of ``length`` nodes: what vLLM's built-in Medusa proposes."""
        return cls(tuple((0,) * d for d in range(1, length + 1)))

    def prefix(self, num_nodes: int) -> TokenTree:
        """The tree made of the first ``num_nodes`` nodes (still valid: BFS order)."""
        if not 0 <= num_nodes <= self.num_nodes:
            raise ValueError(f"prefix of {num_nodes} nodes of a {self.num_nodes}-node tree")
        return TokenTree(self.paths[:num_nodes])

    # ------------------------------------------------------------------ properties
    @property
    def topk(self) -> int:
        """How many candidates per head the tree needs (1 + the largest rank)."""
        return int(self.ranks.max()) + 1 if self.num_nodes else 0

    @property
    def head_index(self) -> np.ndarray:
        """[T] which head proposes node i+1 (= depth - 1)."""
        return self.depths[1:] - 1

    def choices(self) -> list[list[int]]:
        return [list(p) for p in self.paths]

    def __len__(self) -> int:
        return self.num_nodes


def _as_path(choice: Sequence[int]) -> Path:
    try:
        path = tuple(int(x) for x in choice)
        ok = all(float(x) == int(x) for x in choice)
    except (TypeError, ValueError):
        raise ValueError(f"token tree: {choice!r} is not a list of integer ranks") from None
    if not ok:
        raise ValueError(f"token tree: {list(choice)!r} is not a list of integer ranks")
    if not path:
        raise ValueError("token tree: empty path [] (the root is implicit; start at [0])")
    if min(path) < 0:
        raise ValueError(f"token tree: path {list(path)} has a negative rank")
    return path


# ---------------------------------------------------------------------- named trees
def get_tree(spec: str | Sequence[Sequence[int]] | TokenTree, **limits: int | None) -> TokenTree:
    """A tree from a preset name (``"default-63"``, ``"chain-4"``, …), a JSON/Python list of
    paths, or a TokenTree. ``limits`` are passed to :meth:`TokenTree.from_choices`."""
    if isinstance(spec, TokenTree):
        return TokenTree.from_choices(spec.paths, **limits)
    if isinstance(spec, str):
        name = spec.strip()
        if name.startswith("["):
            import json

            try:
                parsed = json.loads(name)
            except json.JSONDecodeError as e:
                raise ValueError(f"token tree: cannot parse {name!r} as a list of paths: {e}")
            return TokenTree.from_choices(parsed, **limits)
        if name.startswith("chain-") and name[6:].isdigit() and int(name[6:]) > 0:
            return TokenTree.from_choices(TokenTree.chain(int(name[6:])).paths, **limits)
        if name not in PRESETS:
            known = ", ".join(sorted(PRESETS)) + ", chain-<N>"
            raise ValueError(f"unknown token tree {name!r}; known trees: {known}")
        return TokenTree.from_choices(PRESETS[name], **limits)
    if not isinstance(spec, (list, tuple)):
        raise ValueError(f"token tree: expected a name or a list of paths, got {type(spec)}")
    return TokenTree.from_choices(spec, **limits)


# ---------------------------------------------------------------------- calibration
def tree_from_accuracies(accuracies: Sequence[Sequence[float]], num_nodes: int) -> TokenTree:
    """The sparse tree of ``num_nodes`` nodes with the largest expected accepted length.

    ``accuracies[k][r]`` is the probability that the rank-``r`` candidate of head ``k`` is the
    right token (per rank, not cumulative: see :func:`per_rank_accuracies`). As in the Medusa
    paper, a node's chance of being accepted is the product of its path's accuracies, and the
    expected accepted length is the sum over nodes; greedy expansion by that product is optimal
    because a child's product never exceeds its parent's.
    """
    acc = [list(map(float, a)) for a in accuracies]
    if not acc or any(not a for a in acc):
        raise ValueError("tree_from_accuracies: need at least one head with one rank")
    if any(not 0.0 <= x <= 1.0 for a in acc for x in a):
        raise ValueError("tree_from_accuracies: accuracies must lie in [0, 1]")
    if num_nodes < 1:
        raise ValueError("tree_from_accuracies: num_nodes must be >= 1")
    frontier: dict[Path, float] = {(r,): acc[0][r] for r in range(len(acc[0]))}
    chosen: list[Path] = []
    while frontier and len(chosen) < num_nodes:
        # highest value; ties by BFS order so the result is deterministic
        best = min(frontier, key=lambda p: (-frontier[p], len(p), p))
        value = frontier.pop(best)
        chosen.append(best)
        depth = len(best)
        if depth < len(acc):
            for r, a in enumerate(acc[depth]):
                frontier[best + (r,)] = value * a
    return TokenTree.from_choices(chosen)


def per_rank_accuracies(cumulative_topk: Sequence[Sequence[float]]) -> list[list[float]]:
    """Top-k accuracies (cumulative, k = 1, 2, …) → per-rank probabilities."""
    out = []
    for row in cumulative_topk:
        prev, ranks = 0.0, []
        for c in row:
            ranks.append(max(float(c) - prev, 0.0))
            prev = max(prev, float(c))
        out.append(ranks)
    return out


def expected_accept_length(tree: TokenTree, accuracies: Sequence[Sequence[float]]) -> float:
    """Expected tokens per step (accepted nodes + the bonus token) under the product model."""
    value = np.ones(tree.num_nodes + 1)
    for i in range(1, tree.num_nodes + 1):
        head, rank = tree.depths[i] - 1, tree.ranks[i]
        a = accuracies[head][rank] if head < len(accuracies) and rank < len(accuracies[head]) else 0
        value[i] = value[tree.parents[i]] * a
    return float(value.sum())
