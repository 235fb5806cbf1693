"""BatchGraphs on a GPU: the captured greedy step replays with each call's inputs and equals the
eager function, per batch size; a batch size without a graph replays the next larger one (its
first rows), and past the largest one runs eagerly."""

from __future__ import annotations

import pytest
import torch

from medusa_vllm.graphed_step import BatchGraphs, greedy_tree_step
from medusa_vllm.tree import TokenTree
from medusa_vllm.tree_tensors import TreeTensors

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TREE = TokenTree.from_choices([(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)])
Q = 7
H, V = 16, 50


def _step_fn(trees, w):
    def propose(h):  # a small "head": logits -> top-1 per tree node
        return (h @ w).topk(Q - 1, dim=-1).indices

    def fn(argmax, drafts, hidden, tree_ids):
        return greedy_tree_step(argmax, drafts, hidden, tree_ids, trees, propose).as_tuple()

    return fn


def _inputs(b, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    argmax = torch.randint(0, 4, (b * Q,), device="cuda", generator=g)
    drafts = torch.randint(0, 4, (b * (Q - 1),), device="cuda", generator=g, dtype=torch.int64).int()
    hidden = torch.randn(b * Q, H, device="cuda", generator=g)
    return argmax, drafts, hidden, torch.zeros(b, dtype=torch.int64, device="cuda")


def test_replays_match_eager_for_every_batch_size_and_call():
    trees = TreeTensors.build([TREE], "cuda")
    fn = _step_fn(trees, torch.randn(H, V, device="cuda"))
    graphs = BatchGraphs(fn, rows_per_req=[Q, Q - 1, Q, 1], max_batch=8, exact=3, name="test")
    for b in (4, 1):
        assert graphs.capture(*_inputs(b, 100 + b))
    # 2 and 3: the graph of 4, padded (its extra requests read earlier calls' rows); 6: past the
    # largest graph, eager
    calls = [3, 1, 3, 4, 2, 1, 6, 3]
    for seed, b in enumerate(calls):
        inputs = _inputs(b, seed)
        got = [t.clone() for t in graphs(*inputs)]
        want = fn(*inputs)
        for x, y in zip(got, want):
            assert x.shape == y.shape and torch.equal(x, y), (b, seed)
    assert graphs.enabled and sorted(graphs.graphs) == [1, 4]
    assert graphs.summary()["graph_replays"] == len(calls) - 1


def test_replay_reads_the_live_contents_of_captured_buffers():
    stale = torch.zeros(1, device="cuda", dtype=torch.int64)

    def fn(x):  # reads a tensor outside the static inputs, by pointer
        return (x + stale,)

    graphs = BatchGraphs(fn, rows_per_req=[1], max_batch=4, exact=1, name="test")
    assert graphs.capture(torch.ones(2, device="cuda", dtype=torch.int64))
    stale.fill_(5)  # the graph sees this (same storage): still equal to eager
    out = graphs(torch.ones(2, device="cuda", dtype=torch.int64))
    assert torch.equal(out[0], torch.full((2,), 6, device="cuda"))


def test_a_graph_that_differs_from_eager_disables_the_graphs():
    calls = []

    def fn(x):  # host state baked into the capture: the replay repeats the captured constant
        calls.append(1)
        return (x + len(calls),)

    graphs = BatchGraphs(fn, rows_per_req=[1], max_batch=4, exact=1, name="test")
    assert not graphs.capture(torch.ones(2, device="cuda", dtype=torch.int64))
    assert not graphs.enabled and graphs(torch.ones(2, device="cuda"))[0].shape == (2,)


def test_padded_replay_moves_no_kv_for_its_extra_requests():
    """The runner's graphed step moves each request's accepted KV (a side effect). A batch size
    replayed on a larger graph must leave the padding requests' stale rows (which would accept
    and move KV at an earlier call's slots) inert: drafts and slots padded with -1."""
    from medusa_vllm import kernels

    trees = TreeTensors.build([TREE], "cuda")
    w = torch.randn(H, V, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(7)
    k_cache = torch.randn(8, 16, 2, 16, device="cuda", generator=g).bfloat16()
    v_cache = torch.randn(8, 16, 2, 16, device="cuda", generator=g).bfloat16()

    def fn(argmax, drafts, hidden, tree_ids, slot_mapping):
        out = _step_fn(trees, w)(argmax, drafts, hidden, tree_ids)
        b = tree_ids.shape[0]
        starts = torch.arange(0, (b + 1) * Q, Q, dtype=torch.int32, device="cuda")
        kernels.move_accepted_kv([k_cache], [v_cache], slot_mapping, starts, out[1], check=False)
        return out

    graphs = BatchGraphs(fn, rows_per_req=[Q, Q - 1, Q, 1, Q], max_batch=8, exact=3, name="test",
                         pad=[None, -1, None, None, -1])
    no_slots = torch.full((4 * Q,), -1, dtype=torch.int64, device="cuda")
    assert graphs.capture(*_inputs(4, 1), no_slots)

    def call(b, seed, accept_all=False):
        argmax, drafts, hidden, tree_ids = _inputs(b, seed)
        if accept_all:  # every draft equals its parent's target token: the deepest path accepted
            argmax.zero_()
            drafts.zero_()
        slots = torch.randperm(8 * 16, device="cuda", generator=g)[: b * Q]
        inputs = (argmax, drafts, hidden, tree_ids, slots)
        before = k_cache.clone(), v_cache.clone()
        got = [t.clone() for t in graphs(*inputs)]
        graphed = k_cache.clone(), v_cache.clone()
        k_cache.copy_(before[0])
        v_cache.copy_(before[1])
        want = fn(*inputs)
        for x, y in zip(got, want):
            assert torch.equal(x, y), (b, seed)
        assert torch.equal(graphed[0], k_cache) and torch.equal(graphed[1], v_cache), (b, seed)
        return got

    assert (call(4, 2, accept_all=True)[2] == 3).all()  # the stale rows now accept 3 nodes each
    for seed in (3, 4):  # a new forward's KV in the cache, then batch 2 on the graph of 4
        k_cache.normal_(generator=g)
        v_cache.normal_(generator=g)
        call(2, seed, accept_all=seed == 3)
    assert graphs.summary()["graph_replays"] == 3
