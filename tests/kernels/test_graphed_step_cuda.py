"""BatchGraphs on a GPU: the captured greedy and sampled steps replay with each call's inputs and
equal the eager function, per batch size; a batch size without a graph replays the next larger
one (its first rows), and past the largest one runs eagerly; the sampled step has no host sync."""

from __future__ import annotations

import pytest
import torch

from medusa_vllm.graphed_step import BatchGraphs, greedy_tree_step, sampled_tree_step
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


def test_captures_share_one_stream_so_one_cublas_workspace():
    """Every capture warms up and is captured on graphed_step.capture_stream. PyTorch keeps a
    cuBLAS workspace per (handle, stream) for good (32 MiB on an H100): with a new stream per
    capture, each graph left one behind (1.0 GiB beside the adaptive tree's 60 verify graphs on
    an H200, d464a94); now 24 more graphs of a few KB add no workspace."""
    trees = TreeTensors.build([TREE], "cuda")
    w = torch.randn(H, V, device="cuda")
    first = BatchGraphs(_step_fn(trees, w), rows_per_req=[Q, Q - 1, Q, 1], max_batch=8, exact=3, name="first")
    assert first.capture(*_inputs(8, 0))  # the capture stream's workspace comes with it, once
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    sets = [BatchGraphs(_step_fn(trees, w), rows_per_req=[Q, Q - 1, Q, 1], max_batch=8, exact=3, name=f"set {i}")
            for i in range(6)]
    for graphs in sets:
        graphs.pool = first.pool
        for b in (8, 4, 2, 1):
            assert graphs.capture(*_inputs(b, b))
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    grown = torch.cuda.memory_reserved() - before
    assert grown < 8 * 2**20, grown  # a workspace per graph: at least 24 x 8 MiB


def test_sets_sharing_one_memory_pool_replay_like_eager_in_any_order():
    """The runners put all their sets in one memory pool (graphs.one_memory_pool): a set's
    replay may overwrite what another set's graph left in the pool, never what its own call
    reads, so calls alternating between sets, each copied before the next, equal eager."""
    trees = TreeTensors.build([TREE], "cuda")
    fns = [_step_fn(trees, torch.randn(H, V, device="cuda")) for _ in range(3)]
    pool = torch.cuda.graph_pool_handle()
    sets = [BatchGraphs(fn, rows_per_req=[Q, Q - 1, Q, 1], max_batch=8, exact=3, name=f"set {i}")
            for i, fn in enumerate(fns)]
    for graphs in sets:
        graphs.pool = pool
        for b in (8, 4, 1):
            assert graphs.capture(*_inputs(b, 100 + b))
    calls = [(0, 8), (1, 4), (2, 1), (0, 3), (2, 8), (1, 8), (0, 1), (1, 2), (2, 4), (0, 8)]
    for seed, (i, b) in enumerate(calls):
        inputs = _inputs(b, seed)
        got = [t.clone() for t in sets[i](*inputs)]
        want = fns[i](*inputs)
        for x, y in zip(got, want):
            assert x.shape == y.shape and torch.equal(x, y), (i, b, seed)
    assert sum(g.summary()["graph_replays"] for g in sets) == len(calls)


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


def _sampled_fn(trees, w, filtered):
    def propose(h):
        return (h @ w).topk(Q - 1, dim=-1).indices

    def fn(logits, drafts, hidden, tree_ids, params, rand):
        return sampled_tree_step(logits, drafts, hidden, tree_ids, params, rand, trees, propose,
                                 "rejection", filtered).as_tuple()

    return fn


def _sampled_inputs(trees, b, seed, dtype=torch.bfloat16, keyed=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = (torch.randn(b * Q, V, device="cuda", generator=g) * 3).to(dtype)
    # drafts often the target's favourite at their parent: paths of several lengths accepted
    at_parent = logits.float().argmax(-1).view(b, Q).gather(1, trees.parents[0, 1:].expand(b, -1))
    drafts = torch.where(torch.rand(b, Q - 1, device="cuda", generator=g) < 0.7, at_parent, 0).int()
    hidden = torch.randn(b * Q, H, device="cuda", generator=g)
    # greedy rows (temperature 0) beside sampled ones with top-k, top-p and min-p
    rows = torch.arange(b, device="cuda")
    params = torch.stack([torch.where(rows % 3 == 0, 0.0, 0.8), torch.where(rows % 2 == 0, 4.0, 0.0),
                          torch.where(rows % 4 == 1, 0.7, 1.0), torch.where(rows % 2 == 1, 0.1, 0.0)], dim=1)
    levels, width = trees.max_depth + 1, trees.children.shape[2]
    if keyed:  # (seed, counter) keys, hashed inside the step (the V2 runner's input)
        rand = torch.randint(-2**62, 2**62, (b, 2), device="cuda", generator=g).abs_()
    else:  # the uniforms themselves (the V1 runner's)
        rand = torch.rand(b, levels * width + 1, device="cuda", generator=g)
    return logits, drafts.flatten(), hidden, torch.zeros(b, dtype=torch.int64, device="cuda"), params, rand


@pytest.mark.parametrize("keyed", [False, True])
@pytest.mark.parametrize("filtered", [False, True])
def test_sampled_replays_match_eager_and_the_step_has_no_host_sync(filtered, keyed):
    trees = TreeTensors.build([TREE], "cuda")
    fn = _sampled_fn(trees, torch.randn(H, V, device="cuda"), filtered)
    graphs = BatchGraphs(fn, rows_per_req=[Q, Q - 1, Q, 1, 1, 1], max_batch=8, exact=3, name="sampled",
                         pad=[None, -1, None, None, None, None])
    # the runner shares the logits buffer between its graph sets
    graphs.buffers = {0: torch.zeros(16 * Q, V, dtype=torch.bfloat16, device="cuda")}
    for b in (4, 1):
        assert graphs.capture(*_sampled_inputs(trees, b, 100 + b, keyed=keyed))
    assert graphs.static[0].data_ptr() == graphs.buffers[0].data_ptr()
    calls = [3, 1, 4, 2, 6]
    for seed, b in enumerate(calls):
        inputs = _sampled_inputs(trees, b, seed, keyed=keyed)
        got = [t.clone() for t in graphs(*inputs)]
        torch.cuda.set_sync_debug_mode("error")  # the eager step: no host sync anywhere
        try:
            want = fn(*inputs)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        for x, y in zip(got, want):
            assert x.shape == y.shape and torch.equal(x, y), (b, seed)
    assert graphs.summary()["graph_replays"] == len(calls) - 1
    # float32 logits (penalties applied) would be cast by the copy into the bf16 buffer: eager
    inputs = _sampled_inputs(trees, 2, 9, torch.float32, keyed=keyed)
    got = graphs(*inputs)
    assert graphs.summary()["graph_replays"] == len(calls) - 1
    assert all(torch.equal(x, y) for x, y in zip(got, fn(*inputs)))


def test_the_memory_held_through_vllms_profile_covers_what_the_graphs_take():
    """The runners hold, through vLLM's memory profile (which sizes the KV cache), what their
    verify graphs will take, measured by running each set's work once eagerly
    (graphs.graph_work, reserved_by): at least what capturing them in one pool then takes."""
    from medusa_vllm.vllm_plugin.graphs import graph_work, one_memory_pool, reserved_by

    vocab, batches = 32000, [32, 8, 1]
    trees = TreeTensors.build([TREE], "cuda")
    w = torch.randn(H, vocab, device="cuda")
    sampled = {(0, f): BatchGraphs(_sampled_fn(trees, w, f), rows_per_req=[Q, Q - 1, Q, 1, 1, 1], max_batch=64,
                                   exact=3, name=f"sampled {f}", pad=[None, -1, None, None, None, None])
               for f in (False, True)}
    greedy = {0: BatchGraphs(_step_fn(trees, w), rows_per_req=[Q, Q - 1, Q, 1], max_batch=64, exact=3, name="greedy")}

    def make_sampled_example(sets):  # as graphs.sampled_example: the logits drawn in place
        shared = torch.zeros(max(g.max_batch for g in sets) * Q, vocab, dtype=torch.bfloat16, device="cuda")
        for g in sets:
            g.buffers = {0: shared}

        def example(b, q, k, gen):
            small = _sampled_inputs(trees, b, 5, keyed=True)[1:]  # (its own logits: V wide, tiny)
            return (shared[: b * Q].normal_(), *small)

        return example

    def greedy_example(b, q, k, gen):
        return _inputs(b, 5)

    run = graph_work(greedy, sampled, lambda k: batches, lambda k: Q, greedy_example, make_sampled_example, "cuda")
    held = reserved_by(run)
    assert all(g.buffers == {} for g in sampled.values())
    with one_memory_pool([*greedy.values(), *sampled.values()]):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info()[0]
        example = make_sampled_example(list(sampled.values()))
        for b in batches:
            assert greedy[0].capture(*greedy_example(b, Q, 0, None))
            for g in sampled.values():
                assert g.capture(*example(b, Q, 0, None))
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        taken = free - torch.cuda.mem_get_info()[0]
    assert taken > 32 * Q * vocab * 2  # at least the shared logits buffer
    assert 0.9 * taken <= held <= 2 * taken, (held, taken)


def test_keyed_uniforms_and_the_final_draw_are_the_same_on_cuda_as_on_the_cpu():
    """A request's random numbers are a function of its key alone: the CPU's and a GPU's agree
    bit for bit, and so does the inverse-CDF token drawn from them."""
    from medusa_vllm.kernels import keyed_uniforms_ref
    from medusa_vllm.sampling import SamplingBatch, keyed_uniforms, sample

    g = torch.Generator().manual_seed(0)
    keys = torch.stack([torch.randint(-2**62, 2**62, (64,), generator=g),
                        torch.randint(0, 2**20, (64,), generator=g)], dim=1)
    u = keyed_uniforms(keys, 51)
    assert torch.equal(keyed_uniforms(keys.cuda(), 51).cpu(), u)
    # the CUDA op and the tensor-op reference on the GPU (the same numbers again)
    assert torch.equal(torch.ops.medusa_vllm.keyed_uniforms(keys.cuda(), 51).cpu(), u)
    assert torch.equal(keyed_uniforms_ref(keys.cuda(), 51).cpu(), u)
    probs = torch.softmax(torch.randn(64, V, generator=g) * 3, -1)
    s = SamplingBatch.greedy(64)
    assert torch.equal(sample(probs.cuda(), s, u[:, -1].cuda()).cpu(), sample(probs, s, u[:, -1]))
