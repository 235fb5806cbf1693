"""The runner's host-side bookkeeping of one step (medusa_vllm.vllm_plugin.step), vLLM-free."""

from __future__ import annotations

import numpy as np

from medusa_vllm.tree import TokenTree
from medusa_vllm.vllm_plugin.step import choose_tree_for_drafts, plan_step, position_offsets

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


def test_partial_drafts_use_the_tree_prefix():
    # a request handed 2 drafts of tree 1 (vLLM trimmed its drafts near max_model_len)
    plan = _plan([3, 6], [2, 5], [1, 1])
    np.testing.assert_array_equal(plan.position_delta[:3], OFFSETS[1][:3])
    np.testing.assert_array_equal(plan.position_delta[3:], OFFSETS[1])
    np.testing.assert_array_equal(plan.tree_ids, [1, 1])


def test_choose_tree_for_drafts():
    sizes = [len(t) for t in TREES]  # [3, 5]
    assert choose_tree_for_drafts(0, 3, sizes) == 0
    assert choose_tree_for_drafts(0, 5, sizes) == 1  # more drafts than its tree: placeholders
    assert choose_tree_for_drafts(None, 2, sizes) == 1
