"""The runner's host-side bookkeeping of one step (medusa_vllm.vllm_plugin.step), vLLM-free."""

from __future__ import annotations

import numpy as np

from medusa_vllm.tree import TokenTree
from medusa_vllm.vllm_plugin.step import plan_step, position_offsets, step_trees, uniform_tree

TREES = [TokenTree.chain(3), TokenTree.from_choices([(0,), (1,), (0, 0), (0, 1), (1, 0)])]
OFFSETS = position_offsets(TREES)
MAX_Q = 1 + max(len(t) for t in TREES)  # 6


def _plan(num_scheduled, num_drafts, tree_ids, done_prefill=None):
    done = np.ones(len(num_scheduled), bool) if done_prefill is None else np.array(done_prefill)
    return plan_step(np.array(num_scheduled), np.array(num_drafts), np.array(tree_ids), done, OFFSETS, MAX_Q)


def test_position_offsets_are_depth_minus_slot():
    # tree 1 in BFS order: root d0, (0,) d1, (1,) d1, (0,0) d2, (0,1) d2, (1,0) d2
    np.testing.assert_array_equal(OFFSETS[1], [0, 0, -1, -1, -2, -3])
    np.testing.assert_array_equal(OFFSETS[0], [0, 0, 0, 0])  # a chain is already linear


def test_uniform_tree_batch_is_all_requests():
    plan = _plan([6, 6], [5, 5], [1, 1])
    assert plan.all_reqs and plan.num_tree_reqs == 2 and plan.num_tree_tokens == 12
    np.testing.assert_array_equal(plan.mask_ids, [2, 2])  # tree k -> mask k + 1
    np.testing.assert_array_equal(plan.position_delta, np.tile(OFFSETS[1], 2))


def test_mixed_batch_leading_decodes_go_to_the_kernel():
    # decode with a chain, decode without drafts, short prefill chunk, long prefill (> MAX_Q)
    plan = _plan([4, 1, 3, 50], [3, 0, 0, 0], [0, 0, 0, 0], [True, True, False, False])
    assert not plan.all_reqs
    assert plan.num_tree_reqs == 2 and plan.num_tree_tokens == 5  # chunks: vLLM's backend
    np.testing.assert_array_equal(plan.mask_ids, [1, 0, 0, 0])  # no drafts -> causal chain
    assert len(plan.position_delta) == 58 and not plan.position_delta.any()


def test_prefill_only_batch_stays_with_vllm():
    plan = _plan([30], [0], [0], [False])
    assert plan.num_tree_reqs == 0 and not plan.all_reqs


def test_step_without_drafts_is_a_plain_step():
    # speculation off (load-adaptive policy) or nothing proposed: vLLM's backend takes it all
    plan = _plan([1, 1, 1, 20], [0, 0, 0, 0], [0, 0, 0, 0], [True, True, True, False])
    assert plan.num_tree_reqs == 0 and plan.num_tree_tokens == 0 and not plan.all_reqs
    assert not plan.position_delta.any()


def test_partial_drafts_use_the_tree_prefix():
    # a request handed 2 drafts of tree 1 (vLLM trimmed its drafts near max_model_len)
    plan = _plan([3, 6], [2, 5], [1, 1])
    np.testing.assert_array_equal(plan.position_delta[:3], OFFSETS[1][:3])
    np.testing.assert_array_equal(plan.position_delta[3:], OFFSETS[1])
    np.testing.assert_array_equal(plan.tree_ids, [1, 1])


def test_step_trees():
    sizes = np.array([len(t) for t in TREES])  # [3, 5]
    # its own tree; more drafts than its tree: placeholders; never recorded
    assert step_trees(np.array([3, 5, 2]), np.array([0, 0, -1]), sizes, 1).tolist() == [0, 1, 1]


def test_uniform_step_cache_equals_the_plan_of_a_uniform_batch():
    import torch

    from medusa_vllm.vllm_plugin.step_cache import UniformStepCache

    cache = UniformStepCache(1, OFFSETS[1], max_num_reqs=4, device=torch.device("cpu"))
    for b in (1, 3):
        plan = _plan([MAX_Q] * b, [MAX_Q - 1] * b, [1] * b)
        u = cache.get(b)
        assert cache.get(b) is u  # made once per batch size
        np.testing.assert_array_equal(u.position_delta.numpy(), plan.position_delta)
        np.testing.assert_array_equal(u.mask_ids.numpy()[:b], plan.mask_ids)
        assert not u.mask_ids[b:].any()  # CUDA-graph padding rows: causal
        np.testing.assert_array_equal(u.tree_ids.numpy(), plan.tree_ids)
        assert u.num_drafts.tolist() == [MAX_Q - 1] * b and bool(u.spec_ok.all())


def test_pinned_upload_round_trips_and_refuses_overflow():
    import pytest
    import torch

    from medusa_vllm.vllm_plugin.step_cache import PinnedUpload

    up = PinnedUpload(8, torch.device("cpu"))
    a, b, c = up(np.array([3, -1]), np.array([True, False]), np.array([7, 8, 9], dtype=np.int32))
    assert a.tolist() == [3, -1] and b.tolist() == [1, 0] and c.tolist() == [7, 8, 9]
    with pytest.raises(ValueError, match="do not fit"):
        up(np.zeros(9))


def test_uniform_drafts_match_vllm_spec_decode_indices():
    import torch

    from medusa_vllm.vllm_plugin.step_cache import uniform_drafts

    b, q = 3, 4
    input_ids = torch.arange(100, 100 + b * q + 5, dtype=torch.int32)  # + CUDA-graph padding
    # vLLM 0.26 (_calc_spec_decode_metadata): input_ids[logits_indices][target_logits_indices + 1]
    logits_indices = torch.arange(b * q)
    target = torch.tensor([r * q + i for r in range(b) for i in range(q - 1)])
    expected = input_ids[logits_indices][target + 1]
    assert torch.equal(uniform_drafts(input_ids, b, q), expected)


def test_uniform_tree_names_the_tree_every_request_verifies_whole():
    sizes = [len(t) for t in TREES]  # [3, 5]
    yes = np.ones(2, bool)

    def uniform(num_scheduled, num_drafts, tree_ids, spec_ok=yes):
        return uniform_tree(_plan(num_scheduled, num_drafts, tree_ids), spec_ok, np.array(num_drafts), sizes)

    assert uniform([6, 6], [5, 5], [1, 1]) == 1
    assert uniform([4, 4], [3, 3], [0, 0]) == 0  # the smaller tree: its own fixed-shape step
    assert uniform([4, 6], [3, 5], [0, 1]) is None  # two trees
    assert uniform([3, 3], [2, 2], [0, 0]) is None  # a truncated tree
    assert uniform([6, 6], [5, 5], [1, 1], np.array([True, False])) is None  # one not verified
    assert uniform([1, 1], [0, 0], [0, 0], np.zeros(2, bool)) is None  # no drafts
