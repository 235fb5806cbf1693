"""The load-adaptive tree policy and the draft-count schedule it hands to vLLM."""

from __future__ import annotations

import pytest

from medusa_vllm.adaptive import NO_TREE, AdaptiveTreePolicy
from medusa_vllm.tree import TokenTree, get_tree

TREES = [get_tree("default-63"), get_tree("sparse-15"), TokenTree.chain(3)]


def policy(budget: int = 512) -> AdaptiveTreePolicy:
    return AdaptiveTreePolicy(TREES, True, budget, "cuda")


def test_largest_tree_that_fits_the_budget_then_none():
    p = policy(512)
    assert [p.choose(b) for b in (1, 8, 9, 32, 128, 129)] == [0, 0, 1, 1, 2, NO_TREE]
    assert [p.num_drafts(b) for b in (1, 8, 9, 32, 128, 129)] == [63, 63, 15, 15, 3, 0]


def test_disabled_policy_keeps_the_main_tree():
    p = AdaptiveTreePolicy(TREES, False, 16, "cuda")
    assert p.choose(1000) == 0


def test_schedule_matches_choose_and_vllm_reads_it():
    from vllm.v1.spec_decode.dynamic.utils import build_dynamic_sd_schedule_lookup

    p = policy(512)
    schedule = p.schedule(256)
    assert schedule[:3] == [(1, 8, 63), (9, 32, 15), (33, 128, 3)]
    assert schedule[-1][0] == 129 and schedule[-1][2] == 0
    lookup = build_dynamic_sd_schedule_lookup(schedule, vllm_max_batch_size=300,
                                              vllm_num_speculative_tokens=63)
    assert all(lookup[b] == p.num_drafts(b) for b in range(1, 301))


def test_tree_of_num_drafts():
    p = policy()
    assert [p.tree_of_num_drafts(n) for n in (63, 15, 3, 0)] == [0, 1, 2, NO_TREE]
    with pytest.raises(ValueError, match="no tree of the adaptive policy has 7 nodes"):
        p.tree_of_num_drafts(7)


def test_equal_sizes_keep_the_first_tree():
    p = AdaptiveTreePolicy([get_tree("sparse-15"), get_tree("sparse-15"), TokenTree.chain(3)], True, 64, "cuda")
    assert p.order == [0, 2] and p.choose(4) == 0
