"""medusa_vllm's tree buffers against xformers' independent implementation (xformers 0.0.35,
``xformers.ops.tree_attention.TreeAttnMetadata.from_tree_choices``; its Python part runs on the CPU
whatever its compiled extension was built for).

Conventions compared:
- ancestor mask == (attention_bias == 0): same rule (a node sees itself, its ancestors, the root);
- depths == tree_seq_position_ids; parents[1:] == parent_node_indices;
- leaf paths == retrieval_indices as a set of rows: xformers documents its rows as unsorted, we
  order them by leaf node id; both pad with -1 after the leaf;
- children: xformers numbers children among the draft tokens (node id - 1: the root is not a
  draft), pads ``child_node_indices`` with 0 and relies on ``num_children_per_node``; we use node
  ids (the root is node 0, as in the ancestor mask and the attention window) and pad with -1, so no
  count is needed. Compared after trimming and shifting by one.
xformers takes the choices in the order given and does not sort them, so we pass ours already
in BFS order (otherwise its node ids would follow the caller's order).
"""

import random

import numpy as np
import pytest
import torch

from medusa_vllm.tree import TokenTree, get_tree
from medusa_vllm.tree_presets import PRESETS

xformers_tree = pytest.importorskip("xformers.ops.tree_attention")


def _random_tree(rng: random.Random, num_nodes: int, max_depth: int = 5, topk: int = 6) -> TokenTree:
    paths: set[tuple[int, ...]] = set()
    while len(paths) < num_nodes:
        parent = rng.choice([()] + [p for p in paths if len(p) < max_depth])
        rank = next(r for r in range(topk + 1) if parent + (r,) not in paths)
        if rank < topk:
            paths.add(parent + (rank,))
    return TokenTree.from_choices(list(paths))


def _compare(tree: TokenTree) -> None:
    meta = xformers_tree.TreeAttnMetadata.from_tree_choices(
        [tuple(p) for p in tree.paths], dtype=torch.float32, device=torch.device("cpu")
    )
    np.testing.assert_array_equal(tree.ancestor_mask, (meta.attention_bias == 0).numpy())
    np.testing.assert_array_equal(tree.depths, meta.tree_seq_position_ids.numpy())
    np.testing.assert_array_equal(tree.parents[1:], meta.parent_node_indices.numpy())
    ours = {tuple(r) for r in tree.leaf_paths.tolist()}
    width = tree.leaf_paths.shape[1]
    theirs = set()
    for row in meta.retrieval_indices.tolist():
        row = row + [-1] * (width - len(row))
        theirs.add(tuple(row[:width]))
    assert ours == theirs
    counts = meta.num_children_per_node.tolist()
    for node in range(tree.num_nodes + 1):
        kids = [c for c in tree.children[node].tolist() if c >= 0]
        theirs_kids = meta.child_node_indices[node, : counts[node]].tolist()
        assert kids == [c + 1 for c in theirs_kids]


@pytest.mark.parametrize("name", sorted(PRESETS) + ["chain-4", "chain-1"])
def test_presets_match_xformers(name):
    _compare(get_tree(name))


@pytest.mark.parametrize("seed", range(20))
def test_random_trees_match_xformers(seed):
    rng = random.Random(seed)
    _compare(_random_tree(rng, rng.randint(1, 80)))
