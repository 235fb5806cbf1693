"""medusa_vllm's V2 runner (vllm_plugin/runner_v2.py) on the CPU: its own parts of a step —
tree positions, mask ids and the attention split; verification, KV move, the hand-over counts
and the next drafts — on V2 input batches laid out as vLLM 0.26's V2 runner lays them out.

vLLM's V2 runner itself needs Triton on a GPU, so the runner here is built without vLLM's
``__init__`` (``_medusa_init`` only) around a stand-in target (logits from a table) and heads (drafts
that name the hidden row they came from): what is checked is medusa_vllm's code against the
general verifier and the reference KV move, not vLLM's.
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from vllm.v1.worker.gpu.input_batch import InputBatch
from vllm.v1.worker.gpu.sample.states import NO_LOGPROBS

from medusa_vllm.kernels import move_accepted_kv_ref
from medusa_vllm.tree import get_tree
from medusa_vllm.tree_tensors import TreeTensors
from medusa_vllm.sampling import SamplingBatch, StepRandomness
from medusa_vllm.verify import verify, verify_greedy
from medusa_vllm.vllm_plugin.config import MedusaSpecConfig
from medusa_vllm.vllm_plugin.runner_v2 import MedusaV2ModelRunner
from medusa_vllm.vllm_plugin.step import V2_GREEDY, V2_NO_SPEC, V2_SAMPLED

TREE = get_tree("sparse-15")
Q = TREE.num_nodes + 1
VOCAB, HIDDEN, NB, BS = 12, 8, 16, 8


class _Target:
    """Logits whose argmax at hidden row i is ``table[i]`` (hidden[:, 0] holds the row id)."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(self.table[hidden[:, 0].long()], VOCAB).float()


class _Heads:
    """Head k's rank-j candidate for hidden row i: 100 * i + 10 * k + j (the row is readable)."""

    def head_topk(self, hidden: torch.Tensor, topk: int):
        i = hidden[:, 0].long()[:, None, None]
        k = torch.arange(4)[None, :, None]
        j = torch.arange(topk)[None, None, :]
        return 100 * i + 10 * k + j, torch.ones(hidden.shape[0], dtype=torch.bool)


def _runner(table: torch.Tensor, prefill_len: list[int], adaptive: list[str] = ()) -> MedusaV2ModelRunner:
    r = MedusaV2ModelRunner.__new__(MedusaV2ModelRunner)
    r.device, r.num_speculative_steps, r.max_num_reqs = torch.device("cpu"), Q - 1, 4
    cfg = MedusaSpecConfig(heads="unused", tree=TREE.choices(), adaptive=bool(adaptive),
                           adaptive_trees=[get_tree(t).choices() for t in adaptive])
    r._medusa_init(cfg, "kernel", graphs=False)
    r.model = _Target(table)
    r.speculator = SimpleNamespace(proposer=_Heads())
    r.req_states = SimpleNamespace(prefill_len=SimpleNamespace(gpu=torch.tensor(prefill_len)))
    r.kv_caches = [torch.randn(2, NB, BS, 2, 4)]
    r.attn_groups = [[SimpleNamespace(backend=SimpleNamespace(kv_views=lambda kv: (kv[0], kv[1])))]]
    r._medusa_mode[:] = V2_GREEDY
    r.sampler = SimpleNamespace(penalties_state=SimpleNamespace(use_penalty=np.zeros(4, dtype=bool)),
                                logit_bias_state=SimpleNamespace(use_logit_bias=np.zeros(4, dtype=bool)),
                                sampling_states=SimpleNamespace(**_logprob_state()), logprobs_mode="raw_logprobs")
    return r


def _logprob_state(num=(NO_LOGPROBS,) * 4) -> dict:
    """V2's per-slot logprob counts (SamplingStates.num_logprobs) and their batch maximum."""
    a = np.array(num, dtype=np.int32)
    return dict(num_logprobs=a, max_num_logprobs=lambda idx: int(np.max(a[idx])))


def _record(r: MedusaV2ModelRunner, trees: list[int]) -> None:
    """Request slots 0.. hold drafts made for ``trees`` (as the runner's propose records them:
    on the host, and on the device where >= 0)."""
    r._medusa_tree_np[: len(trees)] = trees
    r._medusa_req_tree[: len(trees)] = torch.tensor(trees).clamp_min(0)


def _batch(reqs: list[tuple[int, int, int]], seed: int = 0) -> InputBatch:
    """A V2 step of requests (query tokens, drafts, computed tokens) in V2's batch order, as its
    prepare_inputs builds it: logits rows for the root and drafts of a request with drafts, one
    row (the last token) otherwise; linear positions."""
    g = torch.Generator().manual_seed(seed)
    num = np.array([q for q, _, _ in reqs], dtype=np.int32)
    drafts = np.array([d for _, d, _ in reqs], dtype=np.int32)
    computed = np.array([c for _, _, c in reqs], dtype=np.int32)
    r, t = len(reqs), int(num.sum())
    qsl = np.concatenate([[0], np.cumsum(num)]).astype(np.int32)
    n_logits = drafts + 1
    cu = np.concatenate([[0], np.cumsum(n_logits)]).astype(np.int32)
    logits_indices = np.concatenate([qsl[i + 1] - n_logits[i] + np.arange(n_logits[i]) for i in range(r)])
    positions = np.concatenate([computed[i] + np.arange(num[i]) for i in range(r)])
    return InputBatch(
        req_ids=[f"r{i}" for i in range(r)], num_reqs=r, num_reqs_after_padding=r,
        idx_mapping=torch.arange(r, dtype=torch.int32), idx_mapping_np=np.arange(r, dtype=np.int32),
        expanded_idx_mapping=torch.arange(r, dtype=torch.int32).repeat_interleave(torch.from_numpy(n_logits)),
        expanded_local_pos=torch.from_numpy(np.concatenate([np.arange(n) for n in n_logits]).astype(np.int32)),
        num_scheduled_tokens=num, num_tokens=t, num_tokens_after_padding=t,
        num_draft_tokens=int(drafts.sum()), num_draft_tokens_per_req=drafts,
        query_start_loc=torch.from_numpy(qsl), query_start_loc_np=qsl,
        seq_lens=torch.from_numpy(computed + num), seq_lens_cpu_upper_bound=torch.from_numpy(computed + num),
        dcp_local_seq_lens=None, num_computed_tokens_np=computed, prefill_len_np=computed,
        num_computed_prefill_tokens_np=computed, is_prefilling_np=np.zeros(r, dtype=bool), max_seq_len_np=None,
        input_ids=torch.randint(0, VOCAB, (t,), generator=g, dtype=torch.int32),
        positions=torch.from_numpy(positions.astype(np.int64)), is_padding=torch.zeros(t, dtype=torch.bool),
        logits_indices=torch.from_numpy(logits_indices.astype(np.int64)),
        cu_num_logits=torch.from_numpy(cu), cu_num_logits_np=cu,
        has_structured_output_reqs=False, prompt_lens=None,
    )


def _hidden(t: int) -> torch.Tensor:
    h = torch.randn(t, HIDDEN)
    h[:, 0] = torch.arange(t)
    return h


def _accepting_drafts(batch: InputBatch, table: torch.Tensor, tree=TREE) -> None:
    """Half the drafts copy their parent's target token, so paths of several lengths are accepted."""
    g = torch.Generator().manual_seed(1)
    rows = batch.logits_indices
    for r in range(batch.num_reqs):
        s, e = int(batch.cu_num_logits_np[r]), int(batch.cu_num_logits_np[r + 1])
        for j in range(1, e - s):
            if torch.rand((), generator=g) < 0.6:
                batch.input_ids[rows[s + j]] = table[rows[s + int(tree.parents[j])]]


def _verifier_layout(batch: InputBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The step in the general verifier's layout: (row_of_node [R, Q] token rows, -1 beyond the
    request; drafts [R, Q-1])."""
    r = batch.num_reqs
    row_of_node = torch.full((r, Q), -1, dtype=torch.int64)
    drafts = torch.zeros((r, Q - 1), dtype=torch.int64)
    for i in range(r):
        s, e = int(batch.cu_num_logits_np[i]), int(batch.cu_num_logits_np[i + 1])
        toks = batch.logits_indices[s:e]
        row_of_node[i, : e - s] = toks
        drafts[i, : e - s - 1] = batch.input_ids[toks[1:]].long()
    return row_of_node, drafts


def _expected(batch: InputBatch, table: torch.Tensor, trees=(TREE,), tree_ids=None):
    """The general verifier on the same step, in its own layout (``tree_ids``: per request,
    default the first tree)."""
    r = batch.num_reqs
    row_of_node, drafts = _verifier_layout(batch)
    logits = torch.nn.functional.one_hot(table, VOCAB).float()
    ids = torch.zeros(r, dtype=torch.int64) if tree_ids is None else torch.tensor(tree_ids)
    ref = verify_greedy(logits, row_of_node, drafts, torch.from_numpy(batch.num_draft_tokens_per_req).long(),
                        ids, TreeTensors.build(list(trees), q_max=Q))
    return ref, row_of_node


def _slots(batch: InputBatch) -> torch.Tensor:
    return torch.randperm(NB * BS, generator=torch.Generator().manual_seed(2))[: batch.num_tokens]


def test_tree_positions_mask_ids_and_attention_split():
    r = _runner(torch.zeros(1, dtype=torch.int64), [0] * 4)
    # two whole trees, a prefill chunk of 5 tokens, a truncated tree (V2 order: full length first)
    batch = _batch([(Q, Q - 1, 30), (Q, Q - 1, 40), (5, 0, 0), (9, 8, 50)])
    linear = batch.positions.clone()
    r._medusa_prepare_tree(batch)
    depth = torch.from_numpy(TREE.depths)
    want = torch.cat([30 + depth, 40 + depth, torch.arange(5), 50 + depth[:9]])
    assert torch.equal(batch.positions, want)
    assert torch.equal(batch.positions[2 * Q:2 * Q + 5], linear[2 * Q:2 * Q + 5])  # the chunk keeps its own
    assert r.medusa_attn.mask_ids.tolist() == [1, 1, 0, 1]  # the chunk is causal in the kernel
    step = r.medusa_attn.step
    assert (step.num_reqs, step.num_tokens, step.all_reqs) == (4, 2 * Q + 14, True)
    assert r.medusa_paths.key == "mixed"
    # the same mask pattern again: no copy (a stale device value would stay)
    r.medusa_attn.mask_ids[0] = 7
    r._medusa_prepare_tree(_batch([(Q, Q - 1, 30), (Q, Q - 1, 40), (5, 0, 0), (9, 8, 50)]))
    assert r.medusa_attn.mask_ids[0] == 7
    r.medusa_attn.mask_ids[0] = 1
    r._medusa_prepare_tree(_batch([(Q, Q - 1, 3), (Q, Q - 1, 4)]))
    assert r.medusa_paths.key == str(Q - 1) and r.medusa_attn.mask_ids[:2].tolist() == [1, 1]
    # a step without drafts is vLLM's own
    plain = _batch([(1, 0, 7), (1, 0, 9)])
    before = plain.positions.clone()
    r._medusa_prepare_tree(plain)
    assert r.medusa_attn.step is None and torch.equal(plain.positions, before)


def _run_sample(reqs, prefill_len, seed=0):
    batch = _batch(reqs, seed)
    table = torch.randint(0, VOCAB, (batch.num_tokens,), generator=torch.Generator().manual_seed(seed + 5))
    _accepting_drafts(batch, table)
    r = _runner(table, prefill_len)
    _record(r, [0] * len(reqs))  # drafts made for the tree
    r._medusa_slots = _slots(batch)
    r._medusa_prepare_tree(batch)
    hidden = _hidden(batch.num_tokens)
    kv_before = r.kv_caches[0].clone()
    out, num_sampled, num_rejected = r.sample(hidden, batch, None)
    drafts = r._medusa_propose(batch, hidden, dummy_run=False)
    return r, batch, table, kv_before, out, num_sampled, num_rejected, drafts


def _check_kv(r, batch, kv_before, accepted):
    k_ref, v_ref = kv_before[0].clone(), kv_before[1].clone()
    move_accepted_kv_ref([k_ref], [v_ref], r._medusa_slots, batch.query_start_loc, accepted.int())
    assert torch.equal(r.kv_caches[0][0], k_ref) and torch.equal(r.kv_caches[0][1], v_ref)


def _node_drafts(rows: torch.Tensor, tree=TREE) -> torch.Tensor:
    """The drafts _Heads gives for hidden rows ``rows`` in ``tree``'s (head, rank) order, zero
    past its nodes (V2's draft rows hold the largest tree's count)."""
    head = torch.from_numpy(tree.depths[1:] - 1)
    rank = torch.from_numpy(tree.ranks[1:])
    d = 100 * rows[:, None] + 10 * head[None, :] + rank[None, :]
    return torch.nn.functional.pad(d, (0, Q - 1 - tree.num_nodes))


@pytest.mark.parametrize("seed", [0, 1])
def test_uniform_step_verifies_moves_kv_and_drafts_from_the_last_accepted_node(seed):
    reqs = [(Q, Q - 1, 20 + i) for i in range(3)]
    r, batch, table, kv_before, out, num_sampled, num_rejected, drafts = _run_sample(reqs, [0] * 4, seed=seed)
    ref, row_of_node = _expected(batch, table)
    assert r.medusa_paths.counts == {(str(Q - 1), "verify fixed-shape"): 1}  # the graphed function's path
    assert torch.equal(out.sampled_token_ids, ref.tokens)
    assert num_sampled.tolist() == (ref.num_accepted + 1).tolist()
    assert num_rejected.tolist() == (Q - 1 - ref.num_accepted).tolist()
    assert ref.num_accepted.max() > 0
    _check_kv(r, batch, kv_before, ref.accepted)
    last_rows = row_of_node.gather(1, ref.last_node[:, None]).squeeze(1)
    assert torch.equal(drafts, _node_drafts(last_rows))
    assert r.medusa_stats.summary()["tree_steps"] == 3


def test_mixed_step_with_a_prefill_chunk_and_a_truncated_tree():
    # request 1 is a chunk inside its 40-token prompt: it emits nothing and moves nothing
    reqs = [(Q, Q - 1, 20), (5, 0, 10), (9, 8, 30)]
    r, batch, table, kv_before, out, num_sampled, num_rejected, drafts = _run_sample(reqs, [0, 40, 0, 0])
    ref, row_of_node = _expected(batch, table)
    assert r.medusa_paths.counts == {("mixed", "verify general"): 1}
    assert torch.equal(out.sampled_token_ids, ref.tokens)
    assert num_sampled.tolist() == [int(ref.num_accepted[0]) + 1, 0, int(ref.num_accepted[2]) + 1]
    assert num_rejected.tolist() == [Q - 1 - int(ref.num_accepted[0]), 0, 8 - int(ref.num_accepted[2])]
    _check_kv(r, batch, kv_before, ref.accepted)
    last_rows = row_of_node.gather(1, ref.last_node[:, None]).squeeze(1)
    assert last_rows[1] == batch.query_start_loc[2] - 1  # the chunk's last token
    assert torch.equal(drafts, _node_drafts(last_rows))
    assert r.medusa_stats.summary()["tree_steps"] == 2  # requests verified with a tree


class _RootSampler:
    """vLLM's V2 sampler on the root rows, stood in: it records what it saw and gives each
    request 5 + its place in the batch."""

    def __init__(self, logprobs=(NO_LOGPROBS,) * 4) -> None:
        self.seen = {}
        self.sampling_states = SimpleNamespace(**_logprob_state(logprobs))
        self.logprobs_mode = "raw_logprobs"
        self.penalties_state = SimpleNamespace(use_penalty=np.zeros(4, dtype=bool))
        self.logit_bias_state = SimpleNamespace(use_logit_bias=np.zeros(4, dtype=bool))

    def returns_logprobs(self, idx_np) -> bool:  # vLLM's, without logprob_token_ids
        return self.sampling_states.max_num_logprobs(idx_np) != NO_LOGPROBS

    def __call__(self, logits, root_batch):
        self.seen = {"rows": logits.shape[0], "indices": root_batch.logits_indices.tolist()}
        return SimpleNamespace(sampled_token_ids=5 + torch.arange(logits.shape[0])[:, None], logprobs_tensors="lp")


def _nospec_step(logprobs=(NO_LOGPROBS,) * 4):
    """Two whole trees; request 1 cannot speculate (e.g. min_tokens)."""
    reqs = [(Q, Q - 1, 20), (Q, Q - 1, 30)]
    batch = _batch(reqs)
    table = torch.randint(0, VOCAB, (batch.num_tokens,), generator=torch.Generator().manual_seed(5))
    _accepting_drafts(batch, table)
    r = _runner(table, [0] * 4)
    r._medusa_mode[1] = V2_NO_SPEC
    _record(r, [0, 0])
    r.sampler = _RootSampler(logprobs)
    r._medusa_slots = _slots(batch)
    r._medusa_prepare_tree(batch)
    kv_before = r.kv_caches[0].clone()
    hidden = _hidden(batch.num_tokens)
    out, num_sampled, num_rejected = r.sample(hidden, batch, None)
    return r, batch, table, kv_before, hidden, out, num_sampled, num_rejected


def test_a_request_that_cannot_speculate_gets_vllms_token_and_the_others_keep_their_drafts():
    r, batch, table, kv_before, hidden, out, num_sampled, num_rejected = _nospec_step()
    assert r.medusa_paths.counts == {(str(Q - 1), "verify general, some requests without drafts"): 1}
    assert r.sampler.seen == {"rows": 2, "indices": [0, Q]}  # vLLM's sampler saw the root rows
    ref, row_of_node = _expected(batch, table)
    assert ref.num_accepted[0] > 0 and ref.num_accepted[1] > 0  # request 1 had drafts to accept
    assert torch.equal(out.sampled_token_ids[0], ref.tokens[0])
    assert out.sampled_token_ids[1, 0] == 6 and (out.sampled_token_ids[1, 1:] == -1).all()
    assert num_sampled.tolist() == [int(ref.num_accepted[0]) + 1, 1]
    assert num_rejected.tolist() == [Q - 1 - int(ref.num_accepted[0]), Q - 1]
    assert out.logprobs_tensors is None  # nobody asked (vLLM's root logprobs are not used)
    accepted = ref.accepted.clone()
    accepted[1] = -1
    _check_kv(r, batch, kv_before, accepted)
    last = torch.tensor([int(row_of_node[0, ref.last_node[0]]), Q])
    assert torch.equal(r._medusa_propose(batch, hidden, False), _node_drafts(last))
    assert r.medusa_stats.summary()["tree_steps"] == 1  # request 0 only


def test_a_step_whose_non_speculating_request_wants_logprobs_is_vllms_whole():
    r, batch, table, kv_before, hidden, out, num_sampled, num_rejected = _nospec_step(
        logprobs=(NO_LOGPROBS, 2, NO_LOGPROBS, NO_LOGPROBS))
    assert r.medusa_paths.counts == {(str(Q - 1), "verify none (a request that cannot speculate)"): 1}
    assert out.sampled_token_ids[:, 0].tolist() == [5, 6] and (out.sampled_token_ids[:, 1:] == -1).all()
    assert num_sampled.tolist() == [1, 1] and num_rejected.tolist() == [Q - 1, Q - 1]
    assert out.logprobs_tensors == "lp"
    assert torch.equal(r.kv_caches[0], kv_before)
    assert torch.equal(r._medusa_propose(batch, hidden, False), _node_drafts(torch.tensor([0, Q])))


def test_propose_after_a_step_without_drafts_reads_each_last_token():
    r = _runner(torch.zeros(1, dtype=torch.int64), [0] * 4)
    batch = _batch([(7, 0, 0), (3, 0, 0)])  # two prompts' prefills
    hidden = _hidden(batch.num_tokens)
    assert torch.equal(r._medusa_propose(batch, hidden, False), _node_drafts(torch.tensor([6, 9])))


SPARSE7, CHAIN3 = get_tree("sparse-7"), get_tree("chain-3")


def test_step_trees_keeps_the_drafts_tree_unless_they_outgrow_it():
    from medusa_vllm.vllm_plugin.step import step_trees

    sizes = np.array([15, 7, 3])
    got = step_trees(np.array([7, 7, 0, 15, 3, 3]), np.array([1, 2, -1, 0, -1, 2]), sizes, 0)
    # fits its tree; more drafts than chain-3 has; no drafts; the main tree; never proposed; fits
    assert got.tolist() == [1, 0, 0, 0, 0, 2]


def _adaptive_step(reqs, recorded, sched, seed=0):
    batch = _batch(reqs, seed)
    table = torch.randint(0, VOCAB, (batch.num_tokens,), generator=torch.Generator().manual_seed(seed + 5))
    r = _runner(table, [0] * 4, adaptive=["sparse-7", "chain-3"])
    assert r.medusa_tree_sizes == [15, 7, 3]
    _record(r, recorded)
    r._medusa_sched = sched  # the draft count vLLM's scheduler reserved for the next step
    r._medusa_slots = _slots(batch)
    return r, batch, table


@pytest.mark.parametrize("sched, nxt", [(7, SPARSE7), (15, TREE), (3, CHAIN3)])
@pytest.mark.parametrize("seed", [0, 1])
def test_a_smaller_trees_uniform_step(seed, sched, nxt):
    """Tree 1's uniform function verifies the step whatever tree the scheduler's next draft
    count names (the adaptive tree changing its choice: 15 or 3); the next drafts are that
    tree's, gathered from the same heads' top-k at each request's last accepted node."""
    r, batch, table = _adaptive_step([(8, 7, 20), (8, 7, 30), (8, 7, 40)], [1, 1, 1], sched=sched, seed=seed)
    _accepting_drafts(batch, table, tree=SPARSE7)
    linear = batch.positions.clone()
    r._medusa_prepare_tree(batch)
    depth = torch.from_numpy(SPARSE7.depths)
    assert torch.equal(batch.positions - linear, (depth - torch.arange(8)).repeat(3))
    assert r.medusa_attn.mask_ids[:3].tolist() == [2, 2, 2]  # tree 1 (+1)
    kv_before = r.kv_caches[0].clone()
    hidden = _hidden(batch.num_tokens)
    out, num_sampled, num_rejected = r.sample(hidden, batch, None)
    path = "verify fixed-shape" + (", next tree changes" if sched != 7 else "")
    assert r.medusa_paths.counts == {("7", path): 1}
    ref, row_of_node = _expected(batch, table, (TREE, SPARSE7, CHAIN3), [1, 1, 1])
    assert torch.equal(out.sampled_token_ids[:, : ref.tokens.shape[1]], ref.tokens)
    assert (out.sampled_token_ids[:, ref.tokens.shape[1]:] == -1).all()
    assert num_rejected.tolist() == (7 - ref.num_accepted).tolist()
    _check_kv(r, batch, kv_before, ref.accepted)
    last_rows = row_of_node.gather(1, ref.last_node[:, None]).squeeze(1)
    assert torch.equal(r._medusa_propose(batch, hidden, False), _node_drafts(last_rows, nxt))
    k = [TREE, SPARSE7, CHAIN3].index(nxt)
    assert r._medusa_tree_np[:3].tolist() == [k] * 3 and r._medusa_req_tree[:3].tolist() == [k] * 3


def test_no_drafts_next_after_a_uniform_step_forgets_the_tree():
    r, batch, table = _adaptive_step([(8, 7, 20), (8, 7, 30)], [1, 1], sched=0)
    _accepting_drafts(batch, table, tree=SPARSE7)
    r._medusa_prepare_tree(batch)
    hidden = _hidden(batch.num_tokens)
    out, _, _ = r.sample(hidden, batch, None)
    # the uniform function of tree 1 still verifies the step (its CUDA graph on a GPU)
    assert r.medusa_paths.counts == {("7", "verify fixed-shape, next tree changes"): 1}
    ref, _ = _expected(batch, table, (TREE, SPARSE7, CHAIN3), [1, 1])
    assert torch.equal(out.sampled_token_ids[:, : ref.tokens.shape[1]], ref.tokens)
    assert torch.equal(r._medusa_propose(batch, hidden, False), torch.zeros(2, Q - 1, dtype=torch.int64))
    assert r._medusa_tree_np[:2].tolist() == [-1, -1]


def test_a_general_step_with_no_drafts_next_skips_the_heads():
    # a prefill chunk beside a tree: the general path, which drafts only what comes next
    r, batch, table = _adaptive_step([(8, 7, 20), (5, 0, 0)], [1, -1], sched=0)
    r.req_states.prefill_len.gpu = torch.tensor([0, 40, 0, 0])
    r._medusa_prepare_tree(batch)
    hidden = _hidden(batch.num_tokens)
    r.speculator.proposer = None  # the heads must not run
    r.sample(hidden, batch, None)
    assert r.medusa_paths.counts == {("mixed", "verify general"): 1}
    assert torch.equal(r._medusa_propose(batch, hidden, False), torch.zeros(2, Q - 1, dtype=torch.int64))


def test_drafts_made_for_a_smaller_tree_are_verified_as_the_largest():
    # a change of draft count: request 0 got 7 draft slots, but its drafts were made for chain-3
    r, batch, table = _adaptive_step([(8, 7, 20)], [2], sched=7)
    _accepting_drafts(batch, table, tree=TREE)
    linear = batch.positions.clone()
    r._medusa_prepare_tree(batch)
    assert r._medusa_tree_np[0] == 0 and r._medusa_req_tree[0] == 0
    assert r.medusa_attn.mask_ids[0] == 1
    assert torch.equal(batch.positions - linear, torch.from_numpy(TREE.depths[:8]) - torch.arange(8))
    out, _, _ = r.sample(_hidden(batch.num_tokens), batch, None)
    assert r.medusa_paths.counts == {("mixed", "verify general"): 1}
    ref, _ = _expected(batch, table, (TREE, SPARSE7, CHAIN3), [0])
    assert torch.equal(out.sampled_token_ids, ref.tokens)


def test_the_speculator_owns_the_heads_and_hands_over_the_runners_drafts(bundled_model_dir, tmp_path):
    """What V2's runner calls a speculator: built as vLLM builds one (config, device), it loads
    the heads beside the target (DraftModelSpeculator: the runner calls load_model) and its
    propose returns what the runner drafted."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.worker.gpu.spec_decode.speculator import DraftModelSpeculator

    import medusa_vllm.vllm_plugin as plugin
    from medusa_vllm.checkpoint import save_heads
    from medusa_vllm.heads import MedusaHeads, MedusaHeadsConfig
    from medusa_vllm.vllm_plugin.runner_v2 import MedusaV2Speculator

    plugin.register()
    save_heads(MedusaHeads(MedusaHeadsConfig(hidden_size=576, vocab_size=49152)), tmp_path)
    cfg = EngineArgs(model=str(bundled_model_dir), max_model_len=256,
                     speculative_config={"method": "medusa_vllm", "model": str(tmp_path), "tree": "sparse-7"}
                     ).create_engine_config()
    spec = MedusaV2Speculator(cfg, torch.device("cpu"))
    assert isinstance(spec, DraftModelSpeculator) and spec.draft_logits is None and not spec.supports_mm_inputs
    spec.load_model(SimpleNamespace(compute_logits=lambda h: h @ torch.ones(576, 49152, dtype=h.dtype)))
    assert spec.model is spec.proposer.heads and spec.model.config.num_heads == 4
    seen = {}
    spec.runner = SimpleNamespace(_medusa_propose=lambda b, h, d: seen.setdefault("args", (b, h, d)))
    spec.propose("batch", None, None, "hidden", None, None, None, None, None, None, None, dummy_run=True)
    assert seen["args"] == ("batch", "hidden", True)


def _uva(values, dtype):
    a = np.array(values, dtype=dtype)
    return SimpleNamespace(np=a, gpu=torch.from_numpy(a.copy()))


def _sampled_runner(reqs, modes, temps, top_p=None, seed=0, seeds=None):
    batch = _batch(reqs, seed)
    table = torch.randint(0, VOCAB, (batch.num_tokens,), generator=torch.Generator().manual_seed(seed + 5))
    _accepting_drafts(batch, table)
    r = _runner(table, [0, 40, 0, 0])
    r._medusa_mode[: len(modes)] = modes
    n = r.max_num_reqs
    pad = n - len(temps)
    seeds = list(seeds or range(100, 100 + len(temps)))  # vLLM V2's per-request seeds
    r.sampler = SimpleNamespace(penalties_state=r.sampler.penalties_state, logprobs_mode="raw_logprobs",
                                logit_bias_state=r.sampler.logit_bias_state, sampling_states=SimpleNamespace(
        **_logprob_state(), vocab_size=VOCAB, temperature=_uva(list(temps) + [0.0] * pad, np.float32),
        top_k=_uva([VOCAB] * n, np.int32), top_p=_uva(list(top_p or [1.0] * len(temps)) + [1.0] * pad, np.float32),
        min_p=_uva([0.0] * n, np.float32), seeds=_uva(seeds + [0] * (n - len(seeds)), np.int64)))
    _record(r, [0] * len(reqs))
    r._medusa_slots = _slots(batch)
    r._medusa_prepare_tree(batch)
    return r, batch, table


def _sampled_reference(batch, table, sampling, rand=None):
    row_of_node, drafts = _verifier_layout(batch)
    logits = torch.nn.functional.one_hot(table, VOCAB).float() * 3.0
    ref = verify("rejection", logits, row_of_node, drafts, torch.from_numpy(batch.num_draft_tokens_per_req).long(),
                 torch.zeros(batch.num_reqs, dtype=torch.int64), TreeTensors.build([TREE], q_max=Q), sampling,
                 rand=rand)
    return ref, row_of_node


class _SharpTarget(_Target):
    def compute_logits(self, hidden):
        return super().compute_logits(hidden) * 3.0


def test_sampled_requests_speculate_in_a_mixed_step():
    # a sampled tree, a greedy prefill chunk (inside its prompt), a sampled truncated tree
    r, batch, table = _sampled_runner([(Q, Q - 1, 20), (5, 0, 10), (9, 8, 30)],
                                      [V2_SAMPLED, V2_GREEDY, V2_SAMPLED], [0.8, 0.0, 1.0])
    r.model = _SharpTarget(table)
    kv_before = r.kv_caches[0].clone()
    hidden = _hidden(batch.num_tokens)
    out, num_sampled, num_rejected = r.sample(hidden, batch, None)
    assert r.medusa_paths.counts == {("mixed", "verify general sampled"): 1}
    sampling = SamplingBatch(torch.tensor([0.8, 0.0, 1.0]), torch.full((3,), VOCAB), torch.ones(3), None, False,
                             keys=r._medusa_keys(batch))
    ref, row_of_node = _sampled_reference(batch, table, sampling)
    assert torch.equal(out.sampled_token_ids, ref.tokens)
    assert num_sampled.tolist() == [int(ref.num_accepted[0]) + 1, 0, int(ref.num_accepted[2]) + 1]
    _check_kv(r, batch, kv_before, ref.accepted)
    last_rows = row_of_node.gather(1, ref.last_node[:, None]).squeeze(1)
    assert torch.equal(r._medusa_propose(batch, hidden, False), _node_drafts(last_rows))


@pytest.mark.parametrize("seed", [0, 1])
def test_a_uniform_sampled_step_runs_the_fixed_shape_function(seed):
    r, batch, table = _sampled_runner([(Q, Q - 1, 20), (Q, Q - 1, 30), (Q, Q - 1, 40)],
                                      [V2_SAMPLED, V2_SAMPLED, V2_GREEDY], [0.7, 1.0, 0.0], top_p=[0.9, 1.0, 1.0],
                                      seed=seed)
    r.model = _SharpTarget(table)
    kv_before = r.kv_caches[0].clone()
    hidden = _hidden(batch.num_tokens)
    out, num_sampled, num_rejected = r.sample(hidden, batch, None)
    assert r.medusa_paths.counts == {(str(Q - 1), "verify fixed-shape sampled"): 1}
    sampling = SamplingBatch(torch.tensor([0.7, 1.0, 0.0]), torch.full((3,), VOCAB), torch.tensor([0.9, 1.0, 1.0]),
                             None, True, keys=r._medusa_keys(batch))
    trees = TreeTensors.build([TREE], q_max=Q)
    rand = StepRandomness.draw(3, trees.max_depth + 1, trees.children.shape[2], sampling, "cpu")
    ref, row_of_node = _sampled_reference(batch, table, sampling, rand)
    assert torch.equal(out.sampled_token_ids, ref.tokens)
    assert num_rejected.tolist() == (Q - 1 - ref.num_accepted).tolist()
    _check_kv(r, batch, kv_before, ref.accepted)
    last_rows = row_of_node.gather(1, ref.last_node[:, None]).squeeze(1)
    assert torch.equal(r._medusa_propose(batch, hidden, False), _node_drafts(last_rows))


def test_v2_modes():
    from vllm import SamplingParams

    from medusa_vllm.vllm_plugin.step import v2_mode

    assert v2_mode(SamplingParams(temperature=0.0)) == V2_GREEDY
    assert v2_mode(SamplingParams(temperature=0.8, top_p=0.95, top_k=20, min_p=0.05)) == V2_SAMPLED
    assert v2_mode(SamplingParams(temperature=0.8, seed=3)) == V2_SAMPLED
    assert v2_mode(SamplingParams(temperature=0.8, repetition_penalty=1.1)) == V2_SAMPLED
    assert v2_mode(SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.2)) == V2_GREEDY
    assert v2_mode(SamplingParams(temperature=0.0, logit_bias={1: 2.0}, allowed_token_ids=[1, 2])) == V2_GREEDY
    # logprobs in vLLM's raw modes come from each emitted token's row; the processed ones do not
    assert v2_mode(SamplingParams(temperature=0.8, logprobs=1)) == V2_SAMPLED
    assert v2_mode(SamplingParams(temperature=0.0, logprobs=0), "raw_logits") == V2_GREEDY
    assert v2_mode(SamplingParams(temperature=0.0, logprobs=2), "processed_logprobs") == V2_NO_SPEC
    for sp in (SamplingParams(temperature=0.0, min_tokens=3), SamplingParams(temperature=0.0, logprob_token_ids=[3]),
               SamplingParams.for_sampler_warmup(), None):
        assert v2_mode(sp) == V2_NO_SPEC


def test_each_request_keys_its_random_numbers_by_its_seed_and_computed_tokens():
    """The verification's random numbers are hashed from each request's (vLLM V2 seed, computed
    tokens): a request's tokens depend on its own seed, not on the global RNG, nor on where it
    sits in the batch or on the other requests' seeds; another seed, other tokens."""
    reqs = [(Q, Q - 1, 20), (Q, Q - 1, 30)]

    def run(seeds, global_seed, swap=False):
        r, batch, table = _sampled_runner(reqs[::-1] if swap else reqs, [V2_SAMPLED, V2_SAMPLED], [1.0, 1.0],
                                          seeds=seeds[::-1] if swap else seeds)
        r.model = _SharpTarget(table)
        keys = r._medusa_keys(batch)
        assert keys[:, 1].tolist() == (batch.seq_lens[:2] - Q).tolist()  # computed tokens before the step
        torch.manual_seed(global_seed)
        out, _, _ = r.sample(_hidden(batch.num_tokens), batch, None)
        tokens = out.sampled_token_ids
        return tokens.flip(0) if swap else tokens

    a = run([5, 6], 1)
    assert torch.equal(run([5, 6], 2), a)  # the global RNG does not enter
    assert torch.equal(run([5, 7], 1)[0], a[0])  # nor the other request's seed
    moved = [run([5, s], 1)[1] for s in (7, 8, 9, 10)]
    assert not all(torch.equal(m, a[1]) for m in moved)  # its own seed does


def test_sampled_graph_examples_share_the_vocabulary_buffers():
    """graphs.sampled_example (V1 and V2 runners): inputs in the sampled step's layout (the V2
    runner's random numbers as keys), and one logits buffer for every graph set, sized for the
    largest."""
    from medusa_vllm.graphed_step import BatchGraphs
    from medusa_vllm.vllm_plugin.graphs import sampled_example

    trees = TreeTensors.build([TREE, SPARSE7], q_max=Q)
    sets = [BatchGraphs(lambda *x: x, [q, q - 1, q, 1, 1, 1, q], max_batch=b, exact=4, name=str(q))
            for q, b in ((Q, 3), (8, 5))]
    model = SimpleNamespace(compute_logits=lambda h: torch.zeros(h.shape[0], VOCAB, dtype=torch.bfloat16))
    n_rand = (trees.max_depth + 1) * trees.children.shape[2] + 1
    for keyed in (False, True):
        example = sampled_example(sets, model, HIDDEN, "cpu", torch.float32, trees, keyed=keyed)
        assert sets[0].buffers[0] is sets[1].buffers[0] and sets[0].buffers[0].shape == (max(3 * Q, 5 * 8), VOCAB)
        assert list(sets[0].buffers) == [0] and sets[0].buffers[0].dtype == torch.bfloat16
        x = example(2, 8, 1, torch.Generator().manual_seed(0))
        assert [tuple(t.shape) for t in x] == [(16, VOCAB), (14,), (16, HIDDEN), (2,), (2, 4),
                                                (2, 2) if keyed else (2, n_rand)]
        assert x[0].dtype == torch.bfloat16 and x[1].dtype == torch.int32 and x[3].tolist() == [1, 1]
        assert x[5].dtype == (torch.int64 if keyed else torch.float32)


def _penalty_state(n_slots, prompts, outputs, rep, freq, pres):
    """V2's PenaltiesState for request slots 0.. (prompt token lists, output token lists)."""
    words = (VOCAB + 31) // 32
    mask = torch.zeros(n_slots, words, dtype=torch.int32)
    counts = torch.zeros(n_slots, VOCAB, dtype=torch.int32)
    for i, (p, o) in enumerate(zip(prompts, outputs)):
        for t in set(p):
            mask[i, t // 32] |= 1 << (t % 32)
        for t in o:
            counts[i, t] += 1
    n = len(prompts)
    pad = n_slots - n
    return SimpleNamespace(
        use_penalty=np.array([True] * n + [False] * pad),
        prompt_bin_mask=mask, output_bin_counts=counts,
        repetition_penalty=_uva(list(rep) + [1.0] * pad, np.float32),
        frequency_penalty=_uva(list(freq) + [0.0] * pad, np.float32),
        presence_penalty=_uva(list(pres) + [0.0] * pad, np.float32))


def test_unpack_prompt_mask():
    from medusa_vllm.vllm_plugin.penalties_v2 import unpack_prompt_mask

    packed = torch.tensor([[0b101, -(1 << 31)], [0, 1]], dtype=torch.int32)  # bit 31 of word 1: token 63
    m = unpack_prompt_mask(packed, 64)
    assert torch.nonzero(m[0]).flatten().tolist() == [0, 2, 63] and torch.nonzero(m[1]).flatten().tolist() == [32]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_penalties_enter_each_tree_row_along_its_path(seed):
    """Greedy requests with repetition, frequency and presence penalties: each row is penalized
    with the request's prompt and output plus its own path (a dense reference, V2's kernel's
    operations), then verified; rows the chain rule would count wrongly matter here."""
    reqs = [(Q, Q - 1, 20), (Q, Q - 1, 30)]
    batch = _batch(reqs, seed)
    g = torch.Generator().manual_seed(seed + 9)
    table = torch.randint(0, 3, (batch.num_tokens,), generator=g)  # few tokens: many repeats
    batch.input_ids.copy_(torch.randint(0, 3, (batch.num_tokens,), generator=g, dtype=torch.int32))
    _accepting_drafts(batch, table)
    r = _runner(table, [0] * 4)
    r.model = _SharpTarget(table)
    prompts = [[0, 5, 7], [1, 1, 9]]
    outputs = [[2, 2, 0], [1]]
    state = _penalty_state(4, prompts, outputs, rep=[4.0, 3.0], freq=[1.0, 0.0], pres=[0.0, 1.5])
    r.sampler.penalties_state = state
    all_ids = torch.zeros(4, 64, dtype=torch.int32)
    for i, (p, o) in enumerate(zip(prompts, outputs)):
        all_ids[i, : len(p) + len(o)] = torch.tensor(p + o)
    r.req_states.all_token_ids = SimpleNamespace(gpu=all_ids)
    r.req_states.total_len = SimpleNamespace(gpu=torch.tensor([6, 4, 0, 0]))
    _record(r, [0, 0])
    r._medusa_slots = _slots(batch)
    r._medusa_prepare_tree(batch)
    out, _, _ = r.sample(_hidden(batch.num_tokens), batch, None)
    # the dense reference: every row with its whole history spelled out
    row_of_node, drafts = _verifier_layout(batch)
    logits = torch.nn.functional.one_hot(table, VOCAB).float() * 3.0
    for b in range(2):
        for j in range(Q):
            path, node = [], j
            while node > 0:
                path.append(int(drafts[b, node - 1]))
                node = int(TREE.parents[node])
            hist = outputs[b] + path
            row = logits[row_of_node[b, j]]
            counts = torch.bincount(torch.tensor(hist, dtype=torch.int64), minlength=VOCAB).float()
            seen = (counts > 0) | torch.isin(torch.arange(VOCAB), torch.tensor(prompts[b]))
            p = torch.where(seen, torch.tensor(state.repetition_penalty.np[b]), torch.tensor(1.0))
            row = row * torch.where(row > 0, 1.0 / p, p)
            row = row - float(state.frequency_penalty.np[b]) * counts
            row = row - float(state.presence_penalty.np[b]) * (counts > 0)
            logits[row_of_node[b, j]] = row
    ref = verify_greedy(logits, row_of_node, drafts, torch.from_numpy(batch.num_draft_tokens_per_req).long(),
                        torch.zeros(2, dtype=torch.int64), TreeTensors.build([TREE], q_max=Q))
    assert torch.equal(out.sampled_token_ids, ref.tokens)
    unpenalized = verify_greedy(torch.nn.functional.one_hot(table, VOCAB).float(), row_of_node, drafts,
                                torch.from_numpy(batch.num_draft_tokens_per_req).long(),
                                torch.zeros(2, dtype=torch.int64), TreeTensors.build([TREE], q_max=Q))
    assert not torch.equal(unpenalized.tokens, ref.tokens)  # the penalties did change something


def test_new_requests_get_their_mode_and_no_recorded_tree(monkeypatch):
    from vllm import SamplingParams
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    monkeypatch.setattr(GPUModelRunner, "add_requests", lambda self, so: None)  # vLLM's own part
    r = _runner(torch.zeros(1, dtype=torch.int64), [0] * 4)
    r.req_states.req_id_to_index = {"a": 0, "b": 1, "c": 2}
    r.model_config = SimpleNamespace(logprobs_mode="raw_logprobs")
    r._medusa_tree_np[:3] = [0, 0, 0]
    new = [SimpleNamespace(req_id="a", sampling_params=SamplingParams(temperature=0.0)),
           SimpleNamespace(req_id="b", sampling_params=SamplingParams(temperature=0.9, seed=4)),
           SimpleNamespace(req_id="c", sampling_params=SamplingParams(temperature=0.0, min_tokens=2))]
    r.add_requests(SimpleNamespace(scheduled_new_reqs=new))
    assert r._medusa_mode[:3].tolist() == [V2_GREEDY, V2_SAMPLED, V2_NO_SPEC]
    assert r._medusa_tree_np[:3].tolist() == [-1, -1, -1]


def test_dummy_runs_draft_the_largest_tree_and_summary():
    r = _runner(torch.zeros(1, dtype=torch.int64), [0] * 4, adaptive=["sparse-7"])
    batch = _batch([(4, 0, 0), (4, 0, 0)])
    hidden = _hidden(batch.num_tokens)
    r._medusa_next = (1, "left over")  # a dummy run neither uses nor keeps it
    assert torch.equal(r._medusa_propose(batch, hidden, dummy_run=True), _node_drafts(torch.tensor([3, 7])))
    assert r._medusa_next is None and r._medusa_tree_np[:2].tolist() == [-1, -1]
    r.scheduler_config = SimpleNamespace(async_scheduling=True)
    r.speculative_config = SimpleNamespace(num_speculative_tokens_per_batch_size=[(1, 8, 15), (9, 1 << 20, 0)])
    from medusa_vllm.vllm_plugin.worker import MedusaStatsMixin

    summary = MedusaStatsMixin.medusa_stats(SimpleNamespace(model_runner=r))  # the worker's RPC
    assert summary["runner"] == "v2" and summary["draft_schedule"][1][2] == 0 and summary["async_scheduling"]
    assert "penalty_rows_checked" not in summary
    assert set(summary["uniform_greedy"]["by_tree"]) == {"verify+heads+KV move (15 nodes, V2)",
                                                         "verify+heads+KV move (7 nodes, V2)"}
    assert len(summary["uniform_sampled"]["by_tree"]) == 4  # two trees x with/without top-k/top-p


def test_logit_bias_enters_every_row_at_its_tree_position_before_the_penalties():
    """V2's own logit-bias kernel (a stand-in here, recording its arguments) sees the step's
    rows with their tree positions, on a copy, before the path penalties; results keep the
    logits' dtype, as V2's in-place kernels store them."""
    reqs = [(Q, Q - 1, 20), (Q, Q - 1, 30)]
    batch = _batch(reqs)
    table = torch.randint(0, VOCAB, (batch.num_tokens,), generator=torch.Generator().manual_seed(3))
    r = _runner(table, [0] * 4)
    seen = {}

    class Bias:
        use_logit_bias = np.array([False, True, False, False])

        def apply_logit_bias(self, logits, expanded_idx_mapping, idx_mapping_np, pos):
            seen["pos"], seen["rows"] = pos.clone(), expanded_idx_mapping.clone()
            logits[expanded_idx_mapping == 1, 4] += 100.0  # request 1 prefers token 4

    r.sampler.logit_bias_state = Bias()
    _record(r, [0, 0])
    r._medusa_slots = _slots(batch)
    r._medusa_prepare_tree(batch)
    raw = torch.randn(batch.num_tokens, VOCAB).to(torch.bfloat16)
    out = r._medusa_penalized(raw, batch)
    depth = torch.from_numpy(TREE.depths)
    assert torch.equal(seen["pos"], torch.cat([20 + depth, 30 + depth]))  # tree positions
    assert out.dtype == torch.bfloat16 and out is not raw
    assert (out[Q:].float().argmax(dim=1) == 4).all() and torch.equal(out[:Q], raw[:Q])
    assert not (raw[Q:].float().argmax(dim=1) == 4).all()  # the raw logits are untouched


def test_sampled_sets_are_sized_for_their_largest_captured_batch_then_captured():
    """graphs.capture_sampled_sets (V1 and V2 runners): every set's buffers sized for the
    largest batch it captures; enabled sets with one captured on one shared example."""
    from medusa_vllm.graphed_step import BatchGraphs
    from medusa_vllm.vllm_plugin.graphs import capture_sampled_sets

    def bg(max_batch, enabled=True):
        g = BatchGraphs(lambda *x: x, [1], max_batch=max_batch, exact=1, name=str(max_batch))
        g.enabled = enabled
        return g

    sets = {(0, False): bg(64), (0, True): bg(3), (1, False): bg(64, enabled=False), (2, False): bg(64)}
    sizes = {0: [16, 8, 4, 2, 1], 1: [8], 2: []}
    made, captured = [], []
    capture_sampled_sets(sets, sizes.__getitem__, lambda live: made.append(live) or "example",
                         lambda k, g, ex: captured.append((k, g.max_batch, ex)))
    assert [g.max_batch for g in sets.values()] == [16, 2, 8, 0]
    assert made == [[sets[(0, False)], sets[(0, True)]]]  # the disabled and the empty set left out
    assert captured == [(0, 16, "example"), (0, 2, "example")]


class _RowTarget(_Target):
    """Like _Target, plus a small term that differs per hidden row: a logprob says which row
    it came from, and the argmax stays ``table``'s."""

    def compute_logits(self, hidden):
        i = hidden[:, 0:1]
        return 3.0 * super().compute_logits(hidden) + 0.1 * torch.sin(i * torch.arange(1, VOCAB + 1))


def _topk_scores_ref(logits, n, sampled, cu, logits_mode=False):
    """vLLM V2's compute_topk_scores (Triton) in torch: sampled token first, then the top n."""
    from vllm.v1.outputs import LogprobsTensors

    ids = sampled[:, None].long()
    if n > 0:
        ids = torch.cat([ids, logits.topk(n, dim=-1).indices], dim=1)
    x = logits.float() if logits_mode else logits.float().log_softmax(dim=-1)
    ranks = (logits > logits.gather(1, sampled[:, None].long())).sum(dim=1)
    return LogprobsTensors(ids, x.gather(1, ids), ranks, cu)


@pytest.mark.parametrize("reqs,prefill_len,path", [
    ([(Q, Q - 1, 20 + i) for i in range(3)], [0] * 4, (str(Q - 1), "verify fixed-shape")),
    ([(Q, Q - 1, 20), (5, 0, 10), (9, 8, 30)], [0, 40, 0, 0], ("mixed", "verify general")),
])
def test_logprobs_of_every_emitted_token_come_from_its_own_row(monkeypatch, reqs, prefill_len, path):
    """Requests with logprobs speculate (vLLM's raw modes): each emitted token's logprobs are
    those of the logits row that produced it, the root's for the first token, then each
    accepted node's, in D+1 rows per request that V2's output side slices by the emitted count."""
    import medusa_vllm.vllm_plugin.runner_v2 as rv2

    monkeypatch.setattr(rv2, "compute_topk_scores", _topk_scores_ref)
    batch = _batch(reqs)
    table = torch.randint(0, VOCAB, (batch.num_tokens,), generator=torch.Generator().manual_seed(5))
    _accepting_drafts(batch, table)
    r = _runner(table, prefill_len)
    r.model = _RowTarget(table)
    r.sampler.sampling_states = SimpleNamespace(**_logprob_state((2, NO_LOGPROBS, 1, NO_LOGPROBS)))
    _record(r, [0] * len(reqs))
    r._medusa_slots = _slots(batch)
    r._medusa_prepare_tree(batch)
    hidden = _hidden(batch.num_tokens)
    out, num_sampled, _ = r.sample(hidden, batch, None)
    assert r.medusa_paths.counts == {path: 1}
    ref, row_of_node = _expected(batch, table)
    assert torch.equal(out.sampled_token_ids, ref.tokens) and ref.num_accepted.max() > 0
    lp = out.logprobs_tensors
    w = out.sampled_token_ids.shape[1]  # D + 1
    assert lp.cu_num_generated_tokens == list(range(0, len(reqs) * w + 1, w))
    assert lp.logprob_token_ids.shape[1] == 1 + 2  # the batch's largest request count
    checked = 0
    for i in range(len(reqs)):
        nodes = [0] + ref.accepted[i].tolist()
        for j in range(int(num_sampled[i])):
            row = int(row_of_node[i, nodes[j]])
            want = r.model.compute_logits(hidden[row:row + 1]).log_softmax(dim=-1)[0]
            at = lp.cu_num_generated_tokens[i] + j
            assert lp.logprob_token_ids[at, 0] == out.sampled_token_ids[i, j]
            assert torch.allclose(lp.logprobs[at], want[lp.logprob_token_ids[at]])
            checked += 1
    assert checked == int(num_sampled.sum()) > len(reqs)


def test_no_logprobs_asked_none_computed():
    *_, out, _, _, _ = _run_sample([(Q, Q - 1, 20), (Q, Q - 1, 21)], [0] * 4)
    assert out.logprobs_tensors is None
