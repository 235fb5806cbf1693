"""The verification's random numbers: keyed uniforms (a counter-based hash of each request's
(seed, counter)) and the inverse-CDF draw of a sampled token."""

import numpy as np
import pytest
import torch
from scipy.stats import chisquare, kstest

from medusa_vllm.kernels import keyed_uniforms_ref
from medusa_vllm.sampling import SamplingBatch, StepRandomness, keyed_uniforms, sample


def _keys(seeds, counters):
    return torch.stack([torch.as_tensor(seeds, dtype=torch.int64).expand(len(counters)),
                        torch.as_tensor(counters, dtype=torch.int64)], dim=1)


def test_keyed_uniforms_are_a_pure_function_of_each_rows_key():
    keys = _keys([7, -3, 2**62 + 5, 7], [10, 10, 10, 11])
    u = keyed_uniforms(keys, 5)
    assert u.shape == (4, 5) and u.dtype == torch.float32
    assert bool(((u >= 0) & (u < 1)).all())
    # the same key gives the same numbers at any row and in any batch
    assert torch.equal(keyed_uniforms(keys[[2, 0]], 5), u[[2, 0]])
    assert torch.equal(keyed_uniforms(keys[:1], 3), u[:1, :3])  # a prefix of the same stream
    # another seed (also one differing in the high 32 bits only), another counter: other numbers
    other = keyed_uniforms(_keys([7 + 2**40], [10]), 5)
    for a, b in ((0, 1), (0, 2), (0, 3)):
        assert not torch.equal(u[a], u[b])
    assert not torch.equal(other[0], u[0])


def test_the_keyed_uniforms_op_gives_the_references_numbers():
    """The compiled op (csrc/keyed_uniforms_cpu.cpp) against its tensor-op reference, bit for
    bit: seeds of either sign and with high bits, counters past 2**32, batches of 0 rows, no
    draws, a strided key tensor; then the op's error on a malformed key tensor."""
    g = torch.Generator().manual_seed(0)
    keys = torch.stack([torch.randint(-2**63, 2**63 - 1, (300,), generator=g),
                        torch.randint(0, 2**40, (300,), generator=g)], dim=1)
    keys[:4] = torch.tensor([[0, 0], [-1, 2**32 + 7], [2**63 - 1, 2**32 - 1], [-2**63, 1]])
    op = torch.ops.medusa_vllm.keyed_uniforms
    for n in (0, 1, 21, 64):
        assert torch.equal(op(keys, n), keyed_uniforms_ref(keys, n)), n
    assert op(keys[:0], 5).shape == (0, 5)
    columns = keys.t().contiguous().t()  # the same keys, column-major (the wrapper copies them)
    assert torch.equal(keyed_uniforms(columns, 9), keyed_uniforms_ref(keys, 9))
    with pytest.raises((RuntimeError, ValueError), match="keys must be"):
        keyed_uniforms(keys.int(), 3)
    with pytest.raises(RuntimeError, match="keys must be"):
        op(keys[:, :1], 3)


def test_keyed_uniforms_are_uniform_and_independent_across_steps():
    """200,000 steps of one request (counters 0..): each column uniform (Kolmogorov-Smirnov),
    no correlation between consecutive steps or between columns."""
    u = keyed_uniforms(_keys([123456789], list(range(200_000))), 4).double().numpy()
    for j in range(4):
        assert kstest(u[:, j], "uniform").pvalue > 0.001, j
    assert abs(np.corrcoef(u[:-1, 0], u[1:, 0])[0, 1]) < 0.01
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.01
    # and across seeds at one counter (the requests of one step)
    v = keyed_uniforms(torch.stack([torch.arange(200_000), torch.full((200_000,), 17)], dim=1), 1)
    assert kstest(v[:, 0].double().numpy(), "uniform").pvalue > 0.001


def test_step_randomness_from_keys_flat_and_back():
    s = SamplingBatch(torch.ones(3), torch.zeros(3, dtype=torch.int64), torch.ones(3), keys=_keys([5], [1, 2, 3]))
    r = StepRandomness.draw(3, 4, 2, s, "cpu")
    assert r.accept.shape == (3, 4, 2) and r.final.shape == (3,)
    assert torch.equal(r.flat(), keyed_uniforms(s.keys, 9))
    back = StepRandomness.from_flat(r.flat(), 4)
    assert torch.equal(back.accept, r.accept) and torch.equal(back.final, r.final)
    assert torch.equal(s.take(torch.tensor([2, 0])).keys, s.keys[[2, 0]])  # a row keeps its key


def test_sample_is_the_inverse_cdf_and_never_draws_a_zero_probability_token():
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0]] * 5)  # unnormalised rows work too: x 2 below
    u = torch.tensor([0.0, 0.2499, 0.25, 0.9999, 1 - 2**-24])
    s = SamplingBatch.greedy(5)
    assert sample(probs, s, u).tolist() == [1, 1, 3, 3, 3]
    assert sample(probs * 2, s, u).tolist() == [1, 1, 3, 3, 3]
    assert sample(torch.zeros(1, 5), s, torch.tensor([0.5])).tolist() == [0]  # no mass: the argmax


@pytest.mark.parametrize("keyed", [False, True])
def test_sample_follows_the_distribution(keyed):
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(8, generator=g) * 2, -1)
    p[2] = 0.0  # a masked token (top-k/top-p)
    n = 100_000
    probs = p.repeat(n, 1)
    s = SamplingBatch(torch.ones(n), torch.zeros(n, dtype=torch.int64), torch.ones(n), filtered=False,
                      keys=_keys([99], list(range(n))) if keyed else None)
    torch.manual_seed(1)
    tokens = sample(probs, s)
    counts = torch.bincount(tokens, minlength=8).numpy()
    assert counts[2] == 0
    keep = np.arange(8) != 2
    expected = (p / p.sum()).double().numpy() * n
    assert chisquare(counts[keep], expected[keep] * counts[keep].sum() / expected[keep].sum()).pvalue > 0.001
