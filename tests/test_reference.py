"""The reference engine against plain greedy decoding of the bundled SmolLM2 (fp32, CPU)."""
import pytest
import torch

import medusa_vllm.reference as reference
from medusa_vllm.heads import MedusaHeads, MedusaHeadsConfig
from medusa_vllm.prompts import chat
from medusa_vllm.reference import MedusaReference, commit_kv, greedy_decode, tree_attention_mask
from medusa_vllm.tree import get_tree

NEW = 24  # new tokens per request
EXTRA = 3  # oracle tokens past NEW: at the last step (NEW - 1 emitted) head 3 predicts token NEW + 2
QUESTIONS = ["What is 2+2?", "Name three colors of the rainbow and explain why the sky is blue.",
             "Hi", "Write a haiku about the sea."]  # chat prompts of 37, 44, 31, 38 tokens


@pytest.fixture(scope="module")
def model(bundled_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(bundled_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(bundled_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_dir)
    out = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in chat(tokenizer, QUESTIONS)]
    assert len({len(p) for p in out}) == len(out)  # ragged
    return out


@pytest.fixture(scope="module")
def oracle(model, prompts):
    """Greedy continuations of the base model, NEW + EXTRA tokens each."""
    return greedy_decode(model, prompts, NEW + EXTRA)


@pytest.fixture(scope="module")
def truth(model, prompts, oracle):
    """prompt -> (its greedy continuation, final-norm hidden states [L, H] of prompt + it)."""
    with torch.no_grad():
        states = [model.model(input_ids=torch.tensor([p + o])).last_hidden_state[0]
                  for p, o in zip(prompts, oracle)]
    return {tuple(p): (o, h) for p, o, h in zip(prompts, oracle, states)}


def make_heads(model, scale: float) -> MedusaHeads:
    config = MedusaHeadsConfig(model.config.hidden_size, model.config.vocab_size, num_heads=4)
    heads = MedusaHeads(config)
    if scale:
        gen = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            for p in heads.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return heads


class OracleDrafter(MedusaReference):
    """Puts the base model's true greedy continuation at rank ``ranks[k]`` of head k and a wrong
    token at every other rank: the engine must then accept exactly the path of those ranks.
    ``strict``: also check that the tokens so far are right and that the hidden state given to the
    heads is the base model's final-norm hidden state of the last cached token."""

    def __init__(self, model, tree, truth, ranks: list[int], strict: bool = True):
        super().__init__(model, make_heads(model, 0.0), tree)
        self.truth, self.ranks, self.strict = truth, ranks, strict

    def head_candidates(self, hidden, seqs):
        vocab, k = self.model.config.vocab_size, self.tree.topk
        out = torch.zeros(len(seqs), len(self.ranks), k, dtype=torch.int64)
        for b, seq in enumerate(seqs):
            prompt = next(p for p in self.truth if tuple(seq[: len(p)]) == p)
            (tokens, states), done = self.truth[prompt], seq[len(prompt):]
            if self.strict:
                assert done == tokens[: len(done)]
                torch.testing.assert_close(hidden[b], states[len(seq) - 2], rtol=1e-3, atol=1e-3)
            elif done != tokens[: len(done)]:  # a broken engine: draft junk
                continue
            for head, rank in enumerate(self.ranks):
                true = tokens[len(done) + head]  # head k predicts the token after root + k
                out[b, head] = (true + 1 + torch.arange(k)) % vocab  # all wrong ...
                out[b, head, rank] = true  # ... but one
        return out


# ---------------------------------------------------------------------- building blocks
def test_commit_kv_keeps_the_accepted_slots_after_each_rows_context():
    # 2 rows, padded cache of 3 (row 0 holds 3 tokens, row 1 holds 1), then Q = 4 new slots
    x = torch.arange(2 * 7, dtype=torch.float32).reshape(2, 1, 7, 1)  # value = its own index
    keep = torch.tensor([[0, 2, -1], [0, 1, 3]])
    kv, lengths = commit_kv([(x, -x)], torch.tensor([3, 1]), 3, keep)
    assert lengths.tolist() == [5, 4]
    assert kv[0][0][0, 0, :5, 0].tolist() == [0, 1, 2, 3, 5]
    assert kv[0][0][1, 0, :4, 0].tolist() == [7, 10, 11, 13]
    torch.testing.assert_close(kv[0][1], -kv[0][0])


def test_tree_attention_mask_hides_padding_and_non_ancestors():
    tree = get_tree([[0], [1], [0, 0]])  # nodes 1, 2 under the root, node 3 under node 1
    allowed = tree_attention_mask(torch.tensor([2, 1]), 2, torch.from_numpy(tree.ancestor_mask))
    assert allowed.shape == (2, 4, 6)
    assert allowed[0, :, :2].all() and allowed[1, :, 0].all() and not allowed[1, :, 1].any()
    assert allowed[0, 3, 2:].tolist() == [True, True, False, True]  # root, node 1, self


# ---------------------------------------------------------------------- greedy == base model
@pytest.mark.parametrize("scale, tree, rows", [
    pytest.param(0.0, "sparse-15", [1], id="zero-heads-sparse-15-batch-1"),
    pytest.param(0.0, "sparse-15", [0, 1, 2, 3], id="zero-heads-sparse-15-batch-4"),
    pytest.param(0.02, "sparse-15", [0, 1, 2, 3], id="random-heads-sparse-15-batch-4"),
    pytest.param(0.02, "default-63", [3], id="random-heads-default-63-batch-1"),
])
def test_greedy_equals_base_model(model, prompts, oracle, scale, tree, rows):
    engine = MedusaReference(model, make_heads(model, scale), tree)
    result = engine.generate([prompts[r] for r in rows], NEW)
    assert result.tokens == [oracle[r][:NEW] for r in rows]
    assert all(0 < s < NEW for s in result.steps) and result.tau >= 1.0


@pytest.mark.parametrize("ranks, tau", [
    pytest.param([0, 0, 0, 0], 5.0, id="first-branch"),  # nodes 1, 6, 12, 15
    pytest.param([0, 1, 0, 0], 4.0, id="side-branch"),  # nodes 1, 7, 14 (non-contiguous slots)
    pytest.param([2, 0, 0, 0], 3.0, id="third-branch"),  # nodes 3, 11
])
def test_oracle_drafts_are_accepted_along_their_path(model, prompts, oracle, truth, ranks, tau):
    result = OracleDrafter(model, "sparse-15", truth, ranks).generate(prompts, NEW)
    assert result.tokens == [o[:NEW] for o in oracle]
    assert result.tau == tau  # every step accepted exactly the path of `ranks`
    assert result.steps == [-(-(NEW - 1) // int(tau))] * len(prompts)


def test_oracle_drafts_on_default_63_deep_side_branch(model, prompts, oracle, truth):
    engine = OracleDrafter(model, "default-63", truth, [1, 0, 1, 0])
    result = engine.generate(prompts[:1], NEW)
    assert result.tokens == [oracle[0][:NEW]] and result.tau == 4.0  # path [1], [1, 0], [1, 0, 1]


def test_a_kv_compaction_bug_changes_the_tokens(model, prompts, oracle, truth, monkeypatch):
    """Keeping the first slots instead of the accepted ones must be caught by the tests above."""
    def contiguous(kv, lengths, past, keep):
        n = (keep >= 0).sum(dim=1, keepdim=True)
        j = torch.arange(keep.shape[1]).unsqueeze(0)
        return commit_kv(kv, lengths, past, torch.where(j < n, j, -1))

    monkeypatch.setattr(reference, "commit_kv", contiguous)
    engine = OracleDrafter(model, "sparse-15", truth, [0, 1, 0, 0], strict=False)
    result = engine.generate(prompts[:2], NEW)
    assert result.tokens != [o[:NEW] for o in oracle[:2]]


def test_eos_stops_each_request_mid_step(model, prompts, oracle, truth):
    eos = oracle[0][9]  # the 10th token of request 0: inside its 3rd step (4 tokens per step)
    expected = [o[: o.index(eos) + 1] if eos in o[:NEW] else o[:NEW] for o in oracle]
    assert greedy_decode(model, prompts[:1], NEW, eos_token_id=eos) == expected[:1]
    result = OracleDrafter(model, "sparse-15", truth, [0, 1, 0, 0]).generate(
        prompts, NEW, eos_token_id=[eos])
    assert result.tokens == expected and result.steps[0] == 3


def test_eager_attention_takes_the_same_mask(bundled_model_dir, prompts, oracle, truth):
    from transformers import AutoModelForCausalLM

    eager = AutoModelForCausalLM.from_pretrained(bundled_model_dir, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    result = OracleDrafter(eager, "sparse-15", truth, [0, 1, 0, 0]).generate(prompts, NEW)
    assert result.tokens == [o[:NEW] for o in oracle] and result.tau == 4.0


# ---------------------------------------------------------------------- sampling
@pytest.mark.parametrize("rule", ["rejection", "typical"])
def test_sampling_is_reproducible_per_request(model, prompts, oracle, rule):
    engine = MedusaReference(model, make_heads(model, 0.02), "sparse-15", rule=rule)
    kw = dict(temperature=1.0, top_p=0.95, seed=7)
    first = engine.generate(prompts, 12, **kw)
    assert all(len(t) == 12 for t in first.tokens)
    assert first.tokens != [o[:12] for o in oracle]  # it does sample
    assert engine.generate(prompts, 12, **kw).tokens == first.tokens
    # request i samples from seed + i whatever else is in the batch
    assert engine.generate(prompts[2:3], 12, **{**kw, "seed": 9}).tokens[0] == first.tokens[2]


def test_sampling_with_top_k_1_is_greedy(model, prompts, oracle):
    engine = MedusaReference(model, make_heads(model, 0.0), "sparse-15")
    result = engine.generate(prompts, NEW, temperature=1.0, top_k=1, seed=3)
    assert result.tokens == [o[:NEW] for o in oracle]
