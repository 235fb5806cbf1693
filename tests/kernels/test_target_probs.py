"""target_probs (csrc/target_probs_cpu.cpp): the filtered target distribution without a sort,
against its sort reference (kernels.target_probs_ref) and against the sampler's own path
(temperature, min-p, medusa_vllm's top-k/top-p sort, softmax)."""

from __future__ import annotations

import pytest
import torch

from medusa_vllm import kernels, sampling
from medusa_vllm.sampling import SamplingBatch, TargetParams, apply_top_k_top_p_ref


def _params(m: int, vocab: int, g: torch.Generator):
    """Per-row parameters covering every filter alone, together, and off."""
    temp = torch.tensor([1.0, 0.8, 0.3, 1.7])[torch.arange(m) % 4]
    k = torch.tensor([vocab, 1, 20, 0, 200, 7, vocab + 5], dtype=torch.int32)[torch.arange(m) % 7]
    p = torch.tensor([1.0, 1.0, 0.9, 0.5, 0.95, 0.99, 0.3, 1e-6, 0.999])[torch.arange(m) % 9]
    min_p = torch.tensor([0.0, 0.0, 0.05, 0.0, 0.2])[torch.arange(m) % 5]
    return temp, k, p, min_p


def _assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    # the kept sets, where a probability is not a float32 underflow (exp(x - max) of a token
    # ~100 below the top rounds to 0 or to a denormal depending on the order of operations)
    seen = (got > 1e-30) | (want > 1e-30)
    off = ((got > 0) != (want > 0)) & seen
    assert not off.any(), f"kept sets differ in {off.sum(dim=1).tolist()} tokens"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_the_sort_reference(dtype):
    g = torch.Generator().manual_seed(0)
    m, vocab = 45, 3000
    scale = torch.tensor([0.5, 2.0, 6.0])[torch.arange(m) % 3].unsqueeze(1)
    logits = (torch.randn(m, vocab, generator=g) * scale).to(dtype)  # bf16/fp16: many ties
    temp, k, p, min_p = _params(m, vocab, g)
    got = kernels.target_probs(logits, temp, k, p, min_p)
    _assert_same(got, kernels.target_probs_ref(logits, temp, k, p, min_p))
    for args in [(k, None, None), (None, p, None), (None, None, min_p), (None, None, None)]:
        _assert_same(kernels.target_probs(logits, temp, *args), kernels.target_probs_ref(logits, temp, *args))


def test_ties_at_the_boundaries_go_by_token_id():
    # integer logits: whole groups tie; as in vLLM's Triton kernel, of equal logits the lower
    # token id comes first: top-k keeps exactly k, top-p the fewest tied tokens that reach p
    logits = torch.tensor([[3.0, 1.0, 3.0, 2.0, 1.0, 1.0, 0.0, 2.0]])
    one = torch.ones(1)
    probs = kernels.target_probs(logits, one, torch.tensor([3], dtype=torch.int32), None, None)
    assert (probs[0] > 0).tolist() == [True, False, True, True, False, False, False, False]
    e = torch.exp(logits[0] - 3)
    share_top = float(2 * e[0] / e.sum())  # the two tied top tokens' share
    probs = kernels.target_probs(logits, one, None, torch.tensor([share_top * 0.45]), None)
    assert (probs[0] > 0).tolist() == [True, False, False, False, False, False, False, False]
    probs = kernels.target_probs(logits, one, None, torch.tensor([share_top * 1.01]), None)
    assert (probs[0] > 0).tolist() == [True, False, True, True, False, False, False, False]
    for k, p in [(3, 1.0), (5, share_top * 0.45), (4, 0.9), (8, share_top * 1.01)]:
        args = (torch.tensor([k], dtype=torch.int32), torch.tensor([p]), None)
        _assert_same(kernels.target_probs(logits, one, *args), kernels.target_probs_ref(logits, one, *args))


def test_edge_rows():
    vocab = 50
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(1))
    logits[1, 7:] = float("-inf")  # masked tokens (penalties, bans) keep probability 0
    logits[2] = float("-inf")  # nothing left: NaN, as softmax gives
    logits[3, :] = 0.0
    logits[3, 5] = -0.0  # -0 ties with +0
    temp = torch.ones(6)
    k = torch.tensor([vocab, 3, 2, 10, 1, vocab], dtype=torch.int32)
    p = torch.tensor([0.0, 0.9, 0.5, 0.5, 1.0, 0.7])  # p = 0 keeps the top token
    got = kernels.target_probs(logits, temp, k, p, None)
    assert torch.isnan(got[2]).all()
    keep = torch.ones(6, dtype=torch.bool)
    keep[2] = False
    _assert_same(got[keep], kernels.target_probs_ref(logits, temp, k, p, None)[keep])
    assert int((got[0] > 0).sum()) == 1 and float(got[0].max()) == 1.0
    assert (got[1, 7:] == 0).all()
    assert torch.equal((got[3] > 0).nonzero().flatten(), torch.arange(5))  # all tied (-0 too): by token id
    assert int((got[4] > 0).sum()) == 1


def test_strided_rows_and_empty():
    g = torch.Generator().manual_seed(2)
    big = torch.randn(8, 1200, generator=g)
    view = big[::2, 100:1100]  # row stride 2400, vocabulary contiguous
    temp, k, p, min_p = _params(4, 1000, g)
    _assert_same(kernels.target_probs(view, temp, k, p, min_p),
                 kernels.target_probs_ref(view.contiguous(), temp, k, p, min_p))
    empty = kernels.target_probs(torch.zeros(0, 10), torch.ones(0), None, None, None)
    assert empty.shape == (0, 10) and empty.dtype == torch.float32


def test_agrees_with_the_samplers_sort_path():
    """Without ties (float32 logits) the op keeps the tokens medusa_vllm's sort path keeps:
    temperature, min-p, apply_top_k_top_p_ref, softmax."""
    g = torch.Generator().manual_seed(3)
    m, vocab = 36, 4000
    logits = torch.randn(m, vocab, generator=g) * 3
    temp, k, p, min_p = _params(m, vocab, g)
    batch = SamplingBatch(temp, k.long(), p, min_p=min_p)
    params = TargetParams.of(batch, vocab)
    old = sampling.set_target_probs(None)
    try:
        want = sampling.target_probs_of(logits, params)
        sampling.set_target_probs(kernels.target_probs)
        got = sampling.target_probs_of(logits, params)
    finally:
        sampling.set_target_probs(old)
    _assert_same(got, want)
    x = apply_top_k_top_p_ref(logits / temp.unsqueeze(1), params.top_k, params.top_p)  # min-p off rows agree too
    off = min_p == 0
    assert torch.equal((got[off] > 0), torch.isfinite(x[off]))


def test_errors_say_what_is_wrong():
    x = torch.randn(3, 10)
    t = torch.ones(3)
    with pytest.raises(ValueError, match=r"top_k must be \[3\] torch.int32"):
        kernels.target_probs(x, t, torch.ones(3, dtype=torch.int64), None, None)
    with pytest.raises(ValueError, match="logits must be"):
        kernels.target_probs(x[0], t)
    with pytest.raises(RuntimeError, match="contiguous in the vocabulary"):
        torch.ops.medusa_vllm.target_probs(x.t(), torch.ones(10), None, None, None)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        torch.ops.medusa_vllm.target_probs(x.double(), t, None, None, None)
