"""The V2 runner's packed tree step (medusa_vllm.packed_step) against the general verifier, and
its host helpers (vllm_plugin.step.tree_lead; runner_v2._root_batch)."""
import numpy as np
import pytest
import torch

from medusa_vllm.packed_step import greedy_packed, hidden_rows, path_rows, reject_all, slot_rows, tree_positions_delta
from medusa_vllm.tree import get_tree
from medusa_vllm.tree_tensors import TreeTensors
from medusa_vllm.verify import verify_greedy
from medusa_vllm.vllm_plugin.step import position_offsets, tree_lead


def _packed_batch(trees: TreeTensors, counts: list[int], vocab: int, seed: int):
    """A V2-layout step: request r has counts[r] logits rows (1: no drafts); drafts copy the
    target argmax of their parent with probability 1/2, so paths of every length occur."""
    g = torch.Generator().manual_seed(seed)
    parents = trees.parents[0]
    cu = torch.tensor(np.concatenate([[0], np.cumsum(counts)]), dtype=torch.int32)
    argmax = torch.randint(0, vocab, (int(cu[-1]),), generator=g)
    tokens = torch.randint(0, vocab, (int(cu[-1]),), generator=g, dtype=torch.int32)
    for r, c in enumerate(counts):
        s = int(cu[r])
        for j in range(1, c):
            if torch.rand((), generator=g) < 0.5:
                tokens[s + j] = int(argmax[s + int(parents[j])])
    return argmax, tokens, cu


@pytest.mark.parametrize("seed", range(4))
def test_greedy_packed_matches_the_general_verifier(seed):
    tree = get_tree("sparse-31")
    trees = TreeTensors.build([tree])
    q = tree.num_nodes + 1
    counts = [q, 1, q, 9, q, 1]  # full trees, no drafts (a prefill's one row), a truncated tree
    vocab = 5
    argmax, tokens, cu = _packed_batch(trees, counts, vocab, seed)
    r = len(counts)
    out, last_row = greedy_packed(argmax, tokens, cu, torch.zeros(r, dtype=torch.int64), trees)
    # the same step in the general verifier's layout: row of each slot, -1 beyond the request
    row_of_node = torch.full((r, q), -1, dtype=torch.int64)
    drafts = torch.zeros((r, q - 1), dtype=torch.int64)
    for i, c in enumerate(counts):
        row_of_node[i, :c] = torch.arange(int(cu[i]), int(cu[i]) + c)
        drafts[i, : c - 1] = tokens[int(cu[i]) + 1: int(cu[i]) + c].long()
    logits = torch.nn.functional.one_hot(argmax, vocab).float()
    ref = verify_greedy(logits, row_of_node, drafts, torch.tensor(counts) - 1, torch.zeros(r, dtype=torch.int64),
                        trees)
    assert torch.equal(out.tokens, ref.tokens)
    assert torch.equal(out.accepted, ref.accepted)
    assert torch.equal(out.num_accepted, ref.num_accepted)
    assert torch.equal(last_row, row_of_node.gather(1, ref.last_node[:, None]).squeeze(1))
    assert out.num_accepted[[1, 5]].tolist() == [0, 0]  # one row: nothing to accept
    assert out.num_accepted.max() > 0  # the batch does exercise acceptance


def test_slot_rows_and_hidden_rows():
    cu = torch.tensor([0, 3, 4, 6], dtype=torch.int32)
    rows, valid = slot_rows(cu, 4, 6)
    assert rows.tolist() == [[0, 1, 2, 3], [3, 4, 5, 5], [4, 5, 5, 5]]
    assert valid.tolist() == [[True, True, True, False], [True, False, False, False], [True, True, False, False]]
    logits_indices = torch.tensor([10, 11, 12, 20, 30, 31])
    assert hidden_rows(logits_indices, torch.tensor([2, 3, 5])).tolist() == [12, 20, 31]


def test_tree_positions_delta_is_depth_minus_slot():
    tree = get_tree("sparse-15")
    offsets = torch.from_numpy(position_offsets([tree])[0])
    # two requests with drafts (rows 0..4 and 0..2) and one with a single row
    local_pos = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 0], dtype=torch.int32)
    delta = tree_positions_delta(local_pos, offsets)
    depth = torch.from_numpy(tree.depths)
    assert delta.tolist() == (depth[local_pos.long()] - local_pos.long()).tolist()
    assert delta[[0, 5, 8]].tolist() == [0, 0, 0]  # roots and one-row requests keep their positions


def test_reject_all_emits_the_root_tokens_only():
    tree = get_tree("sparse-7")
    trees = TreeTensors.build([tree])
    q = tree.num_nodes + 1
    argmax, tokens, cu = _packed_batch(trees, [q, q], 4, 0)
    tokens[1] = int(argmax[0])  # node 1 accepted in request 0
    out, _ = greedy_packed(argmax, tokens, cu, torch.zeros(2, dtype=torch.int64), trees)
    assert out.num_accepted[0] >= 1
    none, rows = reject_all(out, torch.tensor([7, 9]), cu)
    assert none.num_accepted.tolist() == [0, 0]
    assert none.tokens[:, 0].tolist() == [7, 9] and (none.tokens[:, 1:] == -1).all()
    assert (none.accepted == -1).all() and rows.tolist() == [0, q]


def test_tree_lead_runs_through_the_last_request_with_drafts():
    assert tree_lead(np.array([True, True, False]), np.array([64, 64, 100]), 64) == 2
    # a short prefill chunk between drafted requests goes to the kernel (causal mask) too
    assert tree_lead(np.array([True, False, True]), np.array([64, 5, 30]), 64) == 3
    assert tree_lead(np.array([False, False]), np.array([1, 80]), 64) == 0
    with pytest.raises(RuntimeError, match="longer than 64"):
        tree_lead(np.array([True, False, True]), np.array([64, 80, 30]), 64)


def test_root_batch_keeps_one_row_per_request():
    from vllm.v1.worker.gpu.input_batch import InputBatch, InputBuffers

    from medusa_vllm.vllm_plugin.runner_v2 import _root_batch

    batch = InputBatch.make_dummy(3, 9, InputBuffers(4, 16, torch.device("cpu")))
    # as a spec step would have it: request rows 0..3, 4, 5..8
    cu = torch.tensor([0, 4, 5, 9], dtype=torch.int32)
    batch.cu_num_logits, batch.cu_num_logits_np = cu, cu.numpy()
    batch.logits_indices = torch.arange(9)
    root = _root_batch(batch)
    assert root.logits_indices.tolist() == [0, 4, 5]
    assert root.cu_num_logits.tolist() == [0, 1, 2, 3] and root.cu_num_logits_np.tolist() == [0, 1, 2, 3]
    assert root.expanded_idx_mapping is batch.idx_mapping and root.expanded_local_pos.tolist() == [0, 0, 0]


def test_path_rows_name_the_root_then_each_accepted_node():
    cu = torch.tensor([0, 6, 7, 11], dtype=torch.int32)  # a tree, a prefill row, a truncated tree
    accepted = torch.tensor([[2, 5, -1], [-1, -1, -1], [1, -1, -1]], dtype=torch.int32)
    assert path_rows(cu, accepted).tolist() == [0, 2, 5, 0, 6, 6, 6, 6, 7, 8, 7, 7]
