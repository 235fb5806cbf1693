"""Tree penalties against a row-by-row reference: every tree row penalized as vLLM would with
the request's output plus the row's path, bit for bit (and against vLLM's own apply_penalties
when vLLM is installed)."""

import pytest
import torch

from medusa_vllm.penalties import Penalties, apply_tree_penalties, path_tokens, repetition_penalties_torch
from medusa_vllm.tree import TokenTree, get_tree
from medusa_vllm.tree_tensors import TreeTensors

VOCAB = 40  # small: draft, output and prompt tokens collide often
TREES = [get_tree("sparse-15"), TokenTree.from_choices([[0], [1], [0, 0], [0, 0, 0], [0, 0, 0, 0]])]


def _history(tree: TokenTree, drafts: list[int], slot: int) -> list[int]:
    """Draft tokens on the path root -> slot, walked with the tree's own parents."""
    out = []
    while slot > 0:
        out.append(drafts[slot - 1])
        slot = int(tree.parents[slot])
    return out


def _reference_row(x, prompt, history, presence, frequency, repetition):
    """vLLM's apply_penalties on one row, written out (same operations, same order)."""
    x = x.clone().unsqueeze(0)
    counts = torch.bincount(torch.tensor(history, dtype=torch.int64), minlength=VOCAB).unsqueeze(0)
    prompt_mask = torch.zeros(1, VOCAB, dtype=torch.bool)
    prompt_mask[0, prompt] = True
    repetition_penalties_torch(x, prompt_mask, counts > 0, torch.tensor([repetition]))
    x -= torch.tensor([[frequency]]) * counts
    x -= torch.tensor([[presence]]) * (counts > 0)
    return x[0]


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    trees = TreeTensors.build(TREES)
    b = 5
    tree_ids = torch.tensor([0, 1, 0, 1, 0])
    num_drafts = torch.tensor([15, 5, 0, 3, 7])  # a request without drafts; truncated trees
    drafts = torch.randint(0, 12, (b, 15), generator=g)  # few tokens: repeats along paths
    outputs = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (0, 3, 9, 1, 20)]
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (4, 1, 7, 2, 5)]
    presence = torch.tensor([0.0, 0.5, -0.3, 1.0, 0.2])
    frequency = torch.tensor([0.4, 0.0, 0.25, -0.5, 0.1])
    repetition = torch.tensor([1.3, 1.0, 0.8, 1.1, 2.0])
    rows = int((1 + num_drafts).sum())
    logits = torch.randn(rows, VOCAB, generator=g) * 3
    return trees, tree_ids, num_drafts, drafts, outputs, prompts, presence, frequency, repetition, logits


def _state(outputs, prompts, presence, frequency, repetition, allowed=None):
    b = len(outputs)
    prompt_mask = torch.zeros(b, VOCAB, dtype=torch.bool)
    counts = torch.zeros(b, VOCAB, dtype=torch.int64)
    for i in range(b):
        prompt_mask[i, prompts[i]] = True
        counts[i] += torch.bincount(torch.tensor(outputs[i], dtype=torch.int64), minlength=VOCAB)
    width = max(len(p) + len(o) for p, o in zip(prompts, outputs))
    cand = torch.tensor([p + o + [VOCAB] * (width - len(p) - len(o)) for p, o in zip(prompts, outputs)])
    return Penalties(prompt_mask, counts, presence, frequency, repetition, allowed, candidates=cand)


def _rows(num_drafts):
    req = torch.repeat_interleave(torch.arange(len(num_drafts)), 1 + num_drafts)
    first = torch.cumsum(1 + num_drafts, 0) - (1 + num_drafts)
    return req, torch.arange(len(req)) - first[req]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_row_penalized_with_its_own_path(seed):
    trees, tree_ids, num_drafts, drafts, outputs, prompts, pres, freq, rep, logits = _batch(seed)
    req, slot = _rows(num_drafts)
    slot_tokens = torch.cat([torch.zeros(5, 1, dtype=torch.int64), drafts], 1)
    path = path_tokens(slot_tokens, trees.parents[tree_ids], req, slot, trees.max_depth)
    got = apply_tree_penalties(logits.clone(), req, path, _state(outputs, prompts, pres, freq, rep))
    for row in range(len(req)):
        b, s = int(req[row]), int(slot[row])
        hist = _history(TREES[int(tree_ids[b])], drafts[b].tolist(), s)
        assert sorted(t for t in path[row].tolist() if t >= 0) == sorted(hist)
        want = _reference_row(logits[row], prompts[b], outputs[b] + hist, float(pres[b]), float(freq[b]),
                              float(rep[b]))
        assert torch.equal(got[row], want), (row, b, s, hist)


def test_rows_in_small_chunks_and_allowed_tokens(monkeypatch):
    import medusa_vllm.penalties as mod

    trees, tree_ids, num_drafts, drafts, outputs, prompts, pres, freq, rep, logits = _batch(3)
    req, slot = _rows(num_drafts)
    slot_tokens = torch.cat([torch.zeros(5, 1, dtype=torch.int64), drafts], 1)
    path = path_tokens(slot_tokens, trees.parents[tree_ids], req, slot, trees.max_depth)
    whole = apply_tree_penalties(logits.clone(), req, path, _state(outputs, prompts, pres, freq, rep))
    allowed = torch.rand(5, VOCAB) < 0.3  # True: not allowed
    monkeypatch.setattr(mod, "_CHUNK_ELEMENTS", 3 * VOCAB)  # 3 rows a chunk
    got = apply_tree_penalties(logits.clone(), req, path, _state(outputs, prompts, pres, freq, rep, allowed))
    assert torch.equal(got, whole.masked_fill(allowed[req], float("-inf")))
    # allowed tokens alone (no penalties in the batch)
    only = apply_tree_penalties(logits.clone(), req, path, Penalties(None, None, None, None, None, allowed))
    assert torch.equal(only, logits.masked_fill(allowed[req], float("-inf")))


def test_matches_vllms_apply_penalties():
    utils = pytest.importorskip("vllm.model_executor.layers.utils")
    trees, tree_ids, num_drafts, drafts, outputs, prompts, pres, freq, rep, logits = _batch(4)
    req, slot = _rows(num_drafts)
    slot_tokens = torch.cat([torch.zeros(5, 1, dtype=torch.int64), drafts], 1)
    path = path_tokens(slot_tokens, trees.parents[tree_ids], req, slot, trees.max_depth)
    got = apply_tree_penalties(logits.clone(), req, path, _state(outputs, prompts, pres, freq, rep))
    # vLLM: one row per tree row, its history spelled out, prompts and outputs padded with VOCAB
    hist = [outputs[int(b)] + [t for t in path[i].tolist() if t >= 0] for i, b in enumerate(req)]
    pad = max(len(h) for h in hist)
    out_t = torch.tensor([h + [VOCAB] * (pad - len(h)) for h in hist])
    ppad = max(len(p) for p in prompts)
    prompt_t = torch.tensor([prompts[int(b)] + [VOCAB] * (ppad - len(prompts[int(b)])) for b in req])
    want = utils.apply_penalties(logits.clone(), prompt_t, out_t, pres[req], freq[req], rep[req])
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------- logit bias
def _bias_entries():
    # requests 0, 2 and 4 carry biases (request 2 has no drafts: its root row only); request 4's
    # -100 on token 3 and +5 on token 7 can flip a greedy argmax
    req = torch.tensor([0, 0, 2, 4, 4])
    token = torch.tensor([1, 30, 5, 3, 7])
    value = torch.tensor([2.5, -1.0, 0.75, -100.0, 5.0])
    return req, token, value


def test_logit_bias_reaches_every_row_of_its_request_only():
    from medusa_vllm.penalties import LogitBias, add_logit_bias

    trees, _, num_drafts, *_, logits = _batch(0)
    req, _ = _rows(num_drafts)
    breq, token, value = _bias_entries()
    got = add_logit_bias(logits.clone(), req, LogitBias(breq, token, value, max_rows=16))
    want = logits.clone()
    for r in range(len(req)):
        for b, t, v in zip(breq.tolist(), token.tolist(), value.tolist()):
            if b == int(req[r]):
                want[r, t] += v  # vLLM's LogitBiasLogitsProcessor: logits[req, token] += bias
    assert torch.equal(got, want)
    assert not torch.equal(got, logits)


def test_logit_bias_comes_before_the_penalties_as_in_vllms_sampler():
    """Repetition penalties scale by sign, so the order matters: vLLM adds the bias first."""
    from medusa_vllm.penalties import LogitBias

    trees, tree_ids, num_drafts, drafts, outputs, prompts, pres, freq, rep, logits = _batch(1)
    req, slot = _rows(num_drafts)
    breq, token, value = _bias_entries()
    pen = _state(outputs, prompts, pres, freq, rep)
    pen.bias = LogitBias(breq, token, value, max_rows=16)
    path = path_tokens(drafts_with_root(drafts), trees.parents[tree_ids], req, slot, trees.max_depth)
    got = apply_tree_penalties(logits.clone(), req, path, pen)
    for r in range(len(req)):
        b = int(req[r])
        x = logits[r].clone()
        for bb, t, v in zip(breq.tolist(), token.tolist(), value.tolist()):
            if bb == b:
                x[t] += v
        hist = outputs[b] + _history(TREES[int(tree_ids[b])], drafts[b].tolist(), int(slot[r]))[::-1]
        want = _reference_row(x, prompts[b], hist, float(pres[b]), float(freq[b]), float(rep[b]))
        assert torch.equal(got[r], want), r


def drafts_with_root(drafts):
    return torch.cat([torch.zeros_like(drafts[:, :1]), drafts], dim=1)
