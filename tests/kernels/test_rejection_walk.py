"""rejection_walk (csrc/rejection_walk.h) on the CPU: the op against its tensor-op reference,
exactly (with and without top-k / top-p / min-p), and against the walk of verify_rejection
(tensor ops, float64 draws) it replaces; the edges (rows of -inf, one level, 64 children,
strided rows) and the errors."""

from __future__ import annotations

import pytest
import torch

from medusa_vllm import kernels, verify
from medusa_vllm.kernels import testing as kt
from medusa_vllm.sampling import SamplingBatch, StepRandomness
from medusa_vllm.tree import get_tree
from medusa_vllm.tree_tensors import TreeTensors


def _same(got, want):
    for name, a, b in zip(("accepted", "last_node", "final"), got, want):
        assert torch.equal(a, b), f"{name} differs at requests {(a != b).reshape(a.shape[0], -1).any(1).nonzero()[:, 0].tolist()}"


@pytest.mark.parametrize("filters", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,seed", [(1, 0), (7, 1), (200, 2)])
def test_op_matches_the_reference(batch, seed, dtype, filters):
    args = kt.walk_problem(batch, 3001, seed, logits_dtype=dtype, filters=filters)
    got = kernels.rejection_walk(*args)
    _same(got, kernels.rejection_walk_ref(*args))
    accepted, last, final = got
    if batch >= 200:  # the problem exercises what it should
        lengths = (accepted >= 0).sum(dim=1)
        assert set(lengths.tolist()) >= {0, 1, 2, 3}, lengths.bincount()
        greedy = args[5] <= 1e-5
        assert (lengths[greedy] > 0).any() and (lengths[~greedy] > 0).any()
    # the path: each accepted node a child of the one before, the last one the stopping node
    children = args[2]
    for b in range(batch):
        node = 0
        for n in accepted[b][accepted[b] >= 0].tolist():
            assert n in children[b, node].tolist()
            node = n
        assert last[b].item() == node


def test_greedy_requests_get_the_greedy_rule():
    """A greedy request's walk is the greedy rule (its target is the argmax's point mass): with
    distinct sibling tokens, its path and tokens are verify_greedy's."""
    logits, rows, children, drafts, valid, temp, _, _, _, au, fu = kt.walk_problem(400, 500, seed=3, distinct=True)
    greedy = temp <= 1e-5
    trees = TreeTensors.build([get_tree("default-63", num_heads=4, topk=10), get_tree("sparse-15", num_heads=4, topk=10)])
    tree_ids = (children[:, 0, 5] < 0).long()  # sparse-15's root has 5 children, default-63's 10
    accepted, last, final = kernels.rejection_walk(logits, rows, children, drafts, valid, temp, None, None, None,
                                                   au, fu)
    want = verify.verify_greedy(logits, rows, drafts, valid.sum(1) - 1, tree_ids, trees)
    assert torch.equal(accepted[greedy], want.accepted[greedy])
    assert torch.equal(last[greedy], want.last_node[greedy])
    assert torch.equal(final[greedy], want.tokens[greedy].gather(1, want.num_accepted[greedy, None])[:, 0])


@pytest.mark.parametrize("filters", [False, True])
def test_verify_with_the_op_matches_the_tensor_walk(filters):
    """verify_rejection with the op installed (and, for filtered steps, medusa_vllm's target_probs
    as the filter: the op filters as it does): the same accepted paths as its tensor walk; the
    final token by another inverse CDF over the same distribution (fixed-point masses against
    float64 sums of the normalised float32 probabilities): the same token but where the uniform
    falls within rounding of a boundary."""
    from medusa_vllm import sampling as sampling_module

    logits, rows, children, drafts, valid, temp, k, p, mp, au, fu = kt.walk_problem(300, 2000, seed=4, filters=filters)
    trees = TreeTensors.build([get_tree("default-63", num_heads=4, topk=10), get_tree("sparse-15", num_heads=4, topk=10)])
    tree_ids = (children[:, 0, 5] < 0).long()
    sampling = SamplingBatch(temp, k.long() if filters else torch.zeros(300, dtype=torch.int64),
                             p if filters else torch.ones(300), filtered=filters, min_p=mp)
    rand = StepRandomness(au, fu)
    nodes = valid.sum(1) - 1
    old = verify.set_rejection_walk(None)
    old_filter = sampling_module.set_target_probs(kernels.target_probs)
    try:
        want = verify.verify_rejection(logits, rows, drafts, nodes, tree_ids, trees, sampling, rand=rand)
        verify.set_rejection_walk(kernels.rejection_walk)
        got = verify.verify_rejection(logits, rows, drafts, nodes, tree_ids, trees, sampling, rand=rand)
    finally:
        verify.set_rejection_walk(old)
        sampling_module.set_target_probs(old_filter)
    assert torch.equal(got.accepted, want.accepted) and torch.equal(got.last_node, want.last_node)
    assert torch.equal(got.num_accepted, want.num_accepted)
    assert (got.tokens != want.tokens).any(dim=1).sum() <= 1


def test_filtered_steps_keep_the_engines_filter():
    """With another filter installed (vLLM's op on a GPU, the sort here), a step with top-k /
    top-p / min-p keeps the tensor walk (the op would filter as target_probs does)."""
    calls = []

    def walk_op(*args):
        calls.append(args)
        return kernels.rejection_walk(*args)

    logits, rows, children, drafts, valid, temp, k, p, mp, au, fu = kt.walk_problem(8, 100, seed=9, filters=True)
    trees = TreeTensors.build([get_tree("default-63", num_heads=4, topk=10), get_tree("sparse-15", num_heads=4, topk=10)])
    tree_ids = (children[:, 0, 5] < 0).long()
    old = verify.set_rejection_walk(walk_op)
    try:
        for filtered in (True, False):
            s = SamplingBatch(temp, k.long() if filtered else torch.zeros(8, dtype=torch.int64),
                              p if filtered else torch.ones(8), filtered=filtered)
            verify.verify_rejection(logits, rows, drafts, valid.sum(1) - 1, tree_ids, trees, s,
                                    rand=StepRandomness(au, fu))
    finally:
        verify.set_rejection_walk(old)
    assert len(calls) == 1 and calls[0][6] is None  # the unfiltered step only


def test_edges():
    # a row of -inf (nothing to sample): no child accepted, token 0; one level (no children to walk)
    args = list(kt.walk_problem(8, 300, seed=5))
    args[0][args[1][:, 0].clamp_min(0)] = float("-inf")
    args[5][:] = 0.7
    accepted, last, final = kernels.rejection_walk(*args)
    assert (accepted == -1).all() and (last == 0).all() and (final == 0).all()
    args = kt.walk_problem(8, 300, seed=6, filters=True)
    one_level = (*args[:9], args[9][:, :1].contiguous(), args[10])
    got = kernels.rejection_walk(*one_level)
    assert got[0].shape == (8, 0) and (got[1] == 0).all()
    _same(got, kernels.rejection_walk_ref(*one_level))
    # rows strided inside a wider tensor; 64 children per node (the op's limit)
    wide = torch.randn(args[0].shape[0], 400)
    strided = wide[:, :300]
    strided.copy_(args[0])
    _same(kernels.rejection_walk(strided, *args[1:]), kernels.rejection_walk(*args))
    b, q = 4, 65
    star_children = torch.full((b, q, 64), -1, dtype=torch.int64)
    star_children[:, 0] = torch.arange(1, 65)
    logits = torch.randn(b * q, 100)
    star = (logits, torch.arange(b * q).view(b, q), star_children, torch.randint(0, 100, (b, q - 1)),
            torch.ones(b, q, dtype=torch.bool), torch.full((b,), 2.0), None, None, None, torch.rand(b, 2, 64),
            torch.rand(b))
    _same(kernels.rejection_walk(*star), kernels.rejection_walk_ref(*star))


def test_errors_name_the_argument():
    args = list(kt.walk_problem(2, 50, seed=7, filters=True))
    bad = list(args)
    bad[2] = torch.full((2, args[2].shape[1], 65), -1, dtype=torch.int64)
    with pytest.raises(ValueError, match="children per node must be 1..64"):
        kernels.rejection_walk(*bad)
    bad = list(args)
    bad[3] = args[3].int()
    with pytest.raises(ValueError, match="drafts must be"):
        kernels.rejection_walk(*bad)
    bad = list(args)
    bad[9] = args[9][:, :, :3]
    with pytest.raises(ValueError, match="accept_u must be"):
        kernels.rejection_walk(*bad)
    bad = list(args)
    bad[6] = args[6].long()
    with pytest.raises(ValueError, match="top_k must be"):
        kernels.rejection_walk(*bad)
    with pytest.raises(RuntimeError, match="rejection_walk: valid must be"):  # the op's own check
        torch.ops.medusa_vllm.rejection_walk(*args[:4], args[4][:, :3], *args[5:])
    with pytest.raises(RuntimeError, match="rejection_walk: top_p must be"):
        torch.ops.medusa_vllm.rejection_walk(*args[:7], args[7][:1], *args[8:])


def test_install_uses_the_tensor_walk_without_the_compiled_op(monkeypatch):
    """MEDUSA_VLLM_REJECTION_WALK: ``kernel`` (the default) installs the op only where it is
    compiled; its PyTorch reference is slower than the tensor walk, which serves otherwise."""
    from medusa_vllm.vllm_plugin import rejection_walk

    old = verify.set_rejection_walk(None)
    try:
        monkeypatch.delenv("MEDUSA_VLLM_REJECTION_WALK", raising=False)
        assert rejection_walk.install() == "kernel" and verify._walk_op is kernels.rejection_walk
        monkeypatch.setattr(kernels, "compiled", lambda op: False)
        assert rejection_walk.install() == "tensor" and verify._walk_op is None
        monkeypatch.setenv("MEDUSA_VLLM_REJECTION_WALK", "tensors")
        with pytest.raises(ValueError, match="expected 'kernel'"):
            rejection_walk.install()
    finally:
        verify.set_rejection_walk(old)
