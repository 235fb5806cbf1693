"""The fixed-shape greedy and sampled steps (medusa_vllm.graphed_step) against the general
verifier on the runner's general layout and an explicit proposal, and BatchGraphs' eager
fallback. The CUDA-graph capture itself is tested on
the GPU in tests/kernels/test_graphed_step_cuda.py."""

from __future__ import annotations

import torch

import pytest

from medusa_vllm.graphed_step import (
    BatchGraphs, greedy_tree_step, handover, sampled_tree_step, sampling_params_tensor,
)
from medusa_vllm.sampling import SamplingBatch, StepRandomness
from medusa_vllm.tree import TokenTree
from medusa_vllm.tree_tensors import TreeTensors
from medusa_vllm.verify import verify, verify_greedy

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


def _mixed_sampling(b: int, g: torch.Generator, filtered: bool, min_p: bool) -> SamplingBatch:
    """Greedy requests beside sampled ones with every option (what one vLLM batch may hold)."""
    temperature = torch.where(torch.arange(b) % 3 == 0, 0.0, 0.5 + torch.rand(b, generator=g))
    top_k = torch.where(torch.arange(b) % 2 == 0, torch.randint(1, V, (b,), generator=g), 0) if filtered \
        else torch.zeros(b, dtype=torch.int64)
    top_p = torch.where(torch.arange(b) % 4 == 1, 0.7, 1.0) if filtered else torch.ones(b)
    return SamplingBatch(temperature, top_k, top_p, filtered=filtered,
                         min_p=torch.where(torch.arange(b) % 2 == 1, 0.2, 0.0) if min_p else None)


@pytest.mark.parametrize("rule", ["rejection", "typical"])
@pytest.mark.parametrize("filtered,min_p", [(False, False), (True, False), (False, True), (True, True)])
def test_sampled_tree_step_matches_the_general_verifier(rule, filtered, min_p, walk):
    """The runner's general verifier reads each request's rows from a Q-wide layout (-1 past
    its nodes) with the parameters as tensors of their own; the fixed-shape step reads packed
    rows and one [B, 4] parameter tensor: same random numbers, same outputs, for the largest
    tree and a smaller one (the load-adaptive tree's)."""
    small = TokenTree.from_choices([(0,), (1,), (0, 0)])
    trees = TreeTensors.build([TREES[0], TREES[1], small])
    lengths, sampled_tokens = set(), set()
    for seed, (b, k) in enumerate([(1, 0), (5, 0), (8, 1), (6, 2)]):
        g = torch.Generator().manual_seed(seed)
        q = (Q, Q, 1 + len(small))[k]
        logits = torch.randn(b * q, V, generator=g) * 2
        tree_ids = torch.full((b,), k, dtype=torch.int64)
        # drafts mostly the target's favourite at their parent: paths of several lengths
        at_parent = logits.argmax(-1).view(b, q).gather(1, trees.parents[tree_ids][:, 1:q].clamp_min(0))
        drafts = torch.where(torch.rand(b, q - 1, generator=g) < 0.7, at_parent,
                             torch.randint(0, V, (b, q - 1), generator=g))
        hidden = torch.randn(b * q, 3, generator=g)
        sampling = _mixed_sampling(b, g, filtered, min_p)
        rand = StepRandomness.draw(b, trees.max_depth + 1, trees.children.shape[2], sampling, "cpu")
        got = sampled_tree_step(logits, drafts.reshape(-1).int(), hidden, tree_ids, sampling_params_tensor(sampling),
                                rand.flat(), trees, _propose, rule, filtered or min_p)  # (min-p: the filtered set)
        rows = torch.where(torch.arange(Q)[None, :] < q, torch.arange(b)[:, None] * q + torch.arange(Q)[None, :], -1)
        want = verify(rule, logits, rows, torch.nn.functional.pad(drafts, (0, Q - q)), torch.full((b,), q - 1),
                      tree_ids, trees, sampling, rand=rand)
        assert torch.equal(got.tokens, want.tokens.int()), (rule, seed)
        assert torch.equal(got.accepted, want.accepted.int()) and torch.equal(got.num_accepted, want.num_accepted)
        assert torch.equal(got.drafts, _propose(hidden[torch.arange(b) * q + want.last_node]))
        # greedy requests follow the greedy rule exactly
        greedy = verify_greedy(logits, rows, torch.nn.functional.pad(drafts, (0, Q - q)), torch.full((b,), q - 1),
                               tree_ids, trees)
        g_rows = sampling.is_greedy
        assert torch.equal(got.tokens[g_rows], greedy.tokens[g_rows].int())
        lengths |= set(want.num_accepted.tolist())
        sampled_tokens |= set(got.tokens[~g_rows, 0].tolist())
    assert len(lengths) >= 2 and len(sampled_tokens) >= 2, (lengths, sampled_tokens)


def test_sampled_tree_step_uses_the_given_random_numbers():
    """The step is a function of its inputs (what a graph replays): same inputs, same tokens;
    other random numbers, other sampled tokens."""
    trees = TreeTensors.build(TREES)
    b = 16
    logits, drafts, hidden, tree_ids = _inputs(trees, b, 9)
    sampling = SamplingBatch(torch.ones(b), torch.zeros(b, dtype=torch.int64), torch.ones(b), filtered=False)
    params = sampling_params_tensor(sampling)

    def run(seed):
        torch.manual_seed(seed)
        rand = StepRandomness.draw(b, trees.max_depth + 1, trees.children.shape[2], sampling, "cpu")
        return sampled_tree_step(logits, drafts, hidden, tree_ids, params, rand.flat(), trees, _propose).tokens

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_seeded_requests_draw_from_their_own_generator():
    """A seeded request's random numbers depend on its generator only: the same at any batch
    row, whatever the others draw (vLLM's convention for seeded requests)."""
    def draw(batch, row):
        gens = {row: torch.Generator().manual_seed(42)}
        s = SamplingBatch(torch.ones(batch), torch.zeros(batch, dtype=torch.int64), torch.ones(batch), gens)
        torch.manual_seed(batch)  # the unseeded rows differ from call to call
        r = StepRandomness.draw(batch, 4, 3, s, "cpu")
        return r.accept[row], r.final[row], r.accept[(row + 1) % batch]

    a, n, other_a = draw(3, 0)
    b, m, other_b = draw(5, 3)
    assert torch.equal(a, b) and torch.equal(n, m)
    assert not torch.equal(other_a, other_b)


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


def test_handover_is_each_requests_last_token_and_count():
    # what _bookkeeping_sync hands to vLLM's next step, read from the emitted tokens (-1 pad)
    trees = TreeTensors.build(TREES)
    logits, drafts, hidden, tree_ids = _inputs(trees, 16, seed=3)
    out = greedy_tree_step(logits.argmax(-1), drafts, hidden, tree_ids, trees, _propose)
    last, counts = handover(out.tokens, out.num_accepted)
    assert last.dtype == counts.dtype == torch.int32 and last.shape == counts.shape == (16,)
    emitted = out.tokens
    assert torch.equal(counts.long(), (emitted >= 0).sum(dim=1))
    assert torch.equal(last, emitted.gather(1, (counts.long() - 1)[:, None]).squeeze(1))
    assert len(set(counts.tolist())) > 1  # paths of several lengths: the gather is exercised


def test_graph_work_runs_each_enabled_set_once_at_its_largest_capture():
    """What the runners hold through vLLM's memory profile for their verify graphs comes from
    running each enabled set's function once at the largest batch size it will capture (a
    sampled set: no more than its logits rows allow), with the shared buffers the captures make;
    those buffers are left for the captures to make again."""
    from medusa_vllm.graphed_step import BatchGraphs
    from medusa_vllm.vllm_plugin.graphs import graph_work, reserved_by

    calls = []

    def fn_for(name):
        def fn(x, *rest):
            calls.append((name, x.shape[0], len(rest)))
            return (x + 1,)

        return fn

    greedy = {k: BatchGraphs(fn_for(f"greedy {k}"), rows_per_req=[5], max_batch=m, exact=1, name=str(k))
              for k, m in ((0, 8), (1, 8), (2, 3))}
    greedy[1].enabled = False
    sampled = {(0, f): BatchGraphs(fn_for(f"sampled {f}"), rows_per_req=[5, 1], max_batch=3, exact=1, name=str(f))
               for f in (False, True)}
    made = []

    def make_sampled_example(sets):
        shared = torch.zeros(max(g.max_batch for g in sets) * 5, 4)
        made.append((shared, [g.max_batch for g in sets]))
        for g in sets:
            g.buffers = {0: shared}
        return lambda b, q, k, gen: (torch.zeros(b * q, 4), torch.zeros(b, 1))

    run = graph_work(greedy, sampled, lambda k: [8, 4, 2, 1], lambda k: 5,
                     lambda b, q, k, gen: (torch.zeros(b * q),), make_sampled_example, "cpu")
    kept = run()
    assert calls == [("greedy 0", 40, 0), ("greedy 2", 10, 0), ("sampled False", 10, 1), ("sampled True", 10, 1)]
    assert made[0][1] == [2, 2] and made[0][0].shape == (10, 4)  # the sampled sets' largest capture: 2
    assert any(isinstance(x, list) and x and x[0][0] is made[0][0] for x in kept)  # the shared buffer held
    assert all(g.buffers == {} for g in sampled.values())
    if not torch.cuda.is_available():
        assert reserved_by(run) == 0  # nothing to hold off CUDA
    else:  # a measurement that fails holds nothing (vLLM's own plan), the engine still starts
        greedy[0].fn = lambda *x: 1 / 0
        assert reserved_by(run) == 0
