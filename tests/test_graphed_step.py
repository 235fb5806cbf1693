"""The fixed-shape greedy step (medusa_vllm.graphed_step) against the general verifier and an
explicit proposal, and BatchGraphs' eager fallback. The CUDA-graph capture itself is tested on
the GPU in tests/kernels/test_graphed_step_cuda.py."""

from __future__ import annotations

import torch

from medusa_vllm.graphed_step import BatchGraphs, greedy_tree_step
from medusa_vllm.tree import TokenTree
from medusa_vllm.tree_tensors import TreeTensors
from medusa_vllm.verify import verify_greedy

# two trees of the same size (a uniform step verifies the largest tree; two may tie)
TREES = [TokenTree.from_choices([(0,), (1,), (0, 0), (0, 1), (1, 0)]),
         TokenTree.from_choices([(0,), (0, 0), (0, 0, 0), (1,), (0, 1)])]
Q = 6
V = 5


def _inputs(trees: TreeTensors, b: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b * Q, V, generator=g)
    tree_ids = torch.randint(0, 2, (b,), generator=g)
    # drafts that mostly equal the target argmax at their parent: paths of every length accepted
    at_parent = logits.argmax(-1).view(b, Q).gather(1, trees.parents[tree_ids][:, 1:].clamp_min(0))
    drafts = torch.where(torch.rand(b, Q - 1, generator=g) < 0.6, at_parent,
                         torch.randint(0, V, (b, Q - 1), generator=g))
    hidden = torch.randn(b * Q, 3, generator=g)
    return logits, drafts.reshape(-1), hidden, tree_ids


def _propose(h):  # any deterministic function of the hidden state: here its rounded values
    return (h * 10).round().long()


def test_greedy_tree_step_matches_the_general_verifier():
    trees = TreeTensors.build(TREES)
    lengths = set()
    for b, seed in [(1, 0), (3, 1), (8, 2), (16, 3)]:
        logits, drafts, hidden, tree_ids = _inputs(trees, b, seed)
        got = greedy_tree_step(logits.argmax(-1), drafts, hidden, tree_ids, trees, _propose)
        rows = torch.arange(b)[:, None] * Q + torch.arange(Q)[None, :]
        want = verify_greedy(logits, rows, drafts.view(b, Q - 1), torch.full((b,), Q - 1), tree_ids, trees)
        assert torch.equal(got.tokens, want.tokens.int())
        assert torch.equal(got.accepted, want.accepted.int())
        assert torch.equal(got.num_accepted, want.num_accepted)
        last_rows = torch.arange(b) * Q + want.last_node
        assert torch.equal(got.drafts, _propose(hidden[last_rows]))
        lengths |= set(want.num_accepted.tolist())
    assert len(lengths) >= 3, f"inputs should exercise paths of several lengths, got {lengths}"


def test_greedy_tree_step_of_a_smaller_tree_matches_the_general_verifier():
    # the load-adaptive tree's smaller trees: rows of 1 + 3 slots beside a 6-slot largest tree
    small = TokenTree.from_choices([(0,), (1,), (0, 0)])
    trees = TreeTensors.build([TREES[0], small])
    q, b = 1 + len(small), 4
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(b * q, V, generator=g)
    at_parent = logits.argmax(-1).view(b, q).gather(1, trees.parents[1, 1:q].expand(b, -1))
    drafts = torch.where(torch.rand(b, q - 1, generator=g) < 0.7, at_parent, torch.zeros_like(at_parent))
    hidden = torch.randn(b * q, 3, generator=g)
    tree_ids = torch.ones(b, dtype=torch.int64)
    got = greedy_tree_step(logits.argmax(-1), drafts.reshape(-1), hidden, tree_ids, trees, _propose)
    # the general verifier reads the same rows from a Q-wide layout
    rows = torch.where(torch.arange(Q)[None, :] < q, torch.arange(b)[:, None] * q + torch.arange(Q)[None, :], -1)
    padded = torch.nn.functional.pad(drafts, (0, Q - q))
    want = verify_greedy(logits, rows, padded, torch.full((b,), q - 1), tree_ids, trees)
    assert torch.equal(got.tokens, want.tokens.int()) and torch.equal(got.accepted, want.accepted.int())
    assert torch.equal(got.drafts, _propose(hidden[torch.arange(b) * q + want.last_node]))
    assert want.num_accepted.max() > 0


def test_batch_graphs_without_cuda_run_the_function():
    calls = []

    def fn(x, y):
        calls.append(x.shape[0])
        return x * 2, y + 1

    graphs = BatchGraphs(fn, rows_per_req=[2, 1], max_batch=4, exact=2, name="test")
    graphs.enabled = False  # what the runner sets off the GPU
    assert not graphs.capture(torch.ones(6), torch.zeros(3))
    a, b = graphs(torch.ones(6), torch.zeros(3))
    assert calls == [6] and torch.equal(a, torch.full((6,), 2.0)) and torch.equal(b, torch.ones(3))
