import numpy as np
import pytest

from medusa_vllm.tree import (
    TokenTree,
    expected_accept_length,
    get_tree,
    per_rank_accuracies,
    tree_from_accuracies,
)
from medusa_vllm.tree_presets import PRESETS


def test_hand_worked_small_tree():
    # root ── a[0] ── c[0,0] ── e[0,0,0]
    #      │       └─ d[0,1]
    #      └─ b[1]
    t = TokenTree.from_choices([[0, 0, 0], [1], [0, 1], [0], [0, 0]])  # any input order
    assert t.paths == ((0,), (1,), (0, 0), (0, 1), (0, 0, 0))
    assert t.num_nodes == 5 and t.depth == 3 and t.topk == 2
    np.testing.assert_array_equal(t.parents, [-1, 0, 0, 1, 1, 3])
    np.testing.assert_array_equal(t.depths, [0, 1, 1, 2, 2, 3])
    np.testing.assert_array_equal(t.ranks, [-1, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(t.head_index, [0, 0, 1, 1, 2])
    expected_mask = np.array(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 0, 1, 0, 0, 0],
            [1, 1, 0, 1, 0, 0],
            [1, 1, 0, 0, 1, 0],
            [1, 1, 0, 1, 0, 1],
        ],
        dtype=bool,
    )
    np.testing.assert_array_equal(t.ancestor_mask, expected_mask)
    # leaves b, d, e in node order; -1 padding
    np.testing.assert_array_equal(t.leaf_paths, [[0, 2, -1, -1], [0, 1, 4, -1], [0, 1, 3, 5]])
    np.testing.assert_array_equal(t.children[0], [1, 2])
    np.testing.assert_array_equal(t.children[1], [3, 4])
    np.testing.assert_array_equal(t.children[2], [-1, -1])


@pytest.mark.parametrize("name", sorted(PRESETS) + ["chain-4"])
def test_every_bfs_prefix_is_a_valid_tree(name):
    t = get_tree(name)
    for n in range(1, t.num_nodes + 1):
        p = t.prefix(n)
        TokenTree.from_choices(p.paths)  # validates: every parent present
        np.testing.assert_array_equal(p.ancestor_mask, t.ancestor_mask[: n + 1, : n + 1])
        np.testing.assert_array_equal(p.parents, t.parents[: n + 1])
    # BFS order: depths never decrease
    assert (np.diff(t.depths) >= 0).all()


def test_default_63_is_medusa_mc_sim_7b_63():
    t = get_tree("default-63")
    assert t.num_nodes == 63 and t.depth == 4 and t.topk == 10
    assert t.leaf_paths.shape[0] == 42


def test_ancestor_mask_matches_parent_walk():
    t = get_tree("default-63")
    for i in range(1, t.num_nodes + 1):
        seen, j = {i}, i
        while t.parents[j] >= 0:
            j = t.parents[j]
            seen.add(j)
        assert set(np.flatnonzero(t.ancestor_mask[i])) == seen


@pytest.mark.parametrize(
    "choices, kwargs, message",
    [
        ([], {}, "empty"),
        ([[0], [0]], {}, "duplicate path [0]"),
        ([[0], [1, 0]], {}, "path [1, 0] has no parent"),
        ([[0], [0, 0], [0, 0, 0]], {"num_heads": 2}, "path [0, 0, 0] has depth 3"),
        ([[0], [10]], {"topk": 10}, "path [10] asks for candidate rank 10"),
        ([[0], []], {}, "empty path"),
        ([[0], [-1]], {}, "negative rank"),
        ([[0], ["a"]], {}, "not a list of integer ranks"),
        ([[0], [0.5]], {}, "not a list of integer ranks"),
    ],
)
def test_invalid_specs_name_the_bad_path(choices, kwargs, message):
    with pytest.raises(ValueError) as e:
        TokenTree.from_choices(choices, **kwargs)
    assert message in str(e.value)


def test_get_tree_parses_names_and_json():
    assert get_tree("chain-3").paths == ((0,), (0, 0), (0, 0, 0))
    assert get_tree("[[0], [1], [0, 0]]").num_nodes == 3
    with pytest.raises(ValueError, match="unknown token tree 'nope'"):
        get_tree("nope")
    with pytest.raises(ValueError, match="has depth 4"):
        get_tree("default-63", num_heads=3)


def test_tree_from_accuracies_is_greedy_by_path_probability():
    acc = [[0.6, 0.2, 0.1], [0.5, 0.1, 0.05], [0.4, 0.1, 0.0]]
    t = tree_from_accuracies(acc, 4)
    # values: [0]=.6 [0,0]=.3 [1]=.2 [0,0,0]=.12 [0,1]=.06 [1,0]=.1
    assert t.paths == ((0,), (1,), (0, 0), (0, 0, 0))
    assert expected_accept_length(t, acc) == pytest.approx(1 + 0.6 + 0.2 + 0.3 + 0.12)
    # a bigger budget never lowers the expected length
    lengths = [expected_accept_length(tree_from_accuracies(acc, n), acc) for n in range(1, 12)]
    assert all(b >= a for a, b in zip(lengths, lengths[1:]))


def test_per_rank_accuracies():
    assert per_rank_accuracies([[0.5, 0.7, 0.75]]) == [pytest.approx([0.5, 0.2, 0.05])]
