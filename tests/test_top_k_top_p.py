"""The target distribution's top-k/top-p filter: vLLM's op (what the adapter installs on a GPU
by default) keeps the same tokens as medusa_vllm's sort reference, target_probs goes through an
installed op, and the default is target_probs elsewhere (where compiled). On a CPU vLLM's op is
its PyTorch path; its Triton kernel, the one a GPU runs, is checked against the same reference
in tests/kernels/test_top_k_top_p_cuda.py."""

from __future__ import annotations

import pytest
import torch

from medusa_vllm import sampling
from medusa_vllm.sampling import SamplingBatch, apply_top_k_top_p_ref, set_top_k_top_p, target_probs

V = 1000


def _rows(m: int, seed: int):
    """[m, V] logits without ties (sharp and flat rows) and per-row k, p with every mix of
    off and on (k = V and p = 1 mean off)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.5, 2.0, 6.0])[torch.arange(m) % 3].unsqueeze(1)
    x = torch.randn(m, V, generator=g) * scale
    k = torch.tensor([V, 1, 20, V, 200, 7])[torch.arange(m) % 6]
    p = torch.tensor([1.0, 1.0, 0.9, 0.5, 0.95, 0.99, 0.3])[torch.arange(m) % 7]
    return x, k, p


@pytest.fixture
def restore_filter():
    old, old_op = set_top_k_top_p(None), sampling.set_target_probs(None)
    yield
    set_top_k_top_p(old)
    sampling.set_target_probs(old_op)


@pytest.mark.parametrize("m", [1, 5, 8, 42])
def test_vllms_op_keeps_the_references_tokens(m):
    from medusa_vllm.vllm_plugin.top_k_top_p import vllm_top_k_top_p

    x, k, p = _rows(m, seed=m)
    want = torch.isfinite(apply_top_k_top_p_ref(x.clone(), k, p))
    got = torch.isfinite(vllm_top_k_top_p(x.clone(), k, p))
    assert torch.equal(got, want)
    kept = want.sum(dim=1)
    assert (kept <= k).all() and (kept >= 1).all()
    if m > 1:  # the rows exercise both filters (the one row of m = 1 has both off)
        assert (kept < V).any() and (kept > 1).any()


def test_target_probs_goes_through_an_installed_op(restore_filter):
    x, k, p = _rows(12, seed=3)
    s = SamplingBatch(torch.full((12,), 0.7), k, p)
    want = target_probs(x, s)  # the reference
    calls = []

    def op(xx, kk, pp):
        calls.append((kk.clone(), pp.clone()))
        return apply_top_k_top_p_ref(xx, kk, pp)

    set_top_k_top_p(op)
    torch.testing.assert_close(target_probs(x, s), want, rtol=0, atol=0)
    assert len(calls) == 1 and torch.equal(calls[0][0], k) and torch.equal(calls[0][1], p)
    # a batch without top-k/top-p (filtered=False) never calls it
    target_probs(x, SamplingBatch(s.temperature, s.top_k, s.top_p, filtered=False))
    assert len(calls) == 1


def test_the_default_is_vllms_op_on_a_gpu_and_target_probs_elsewhere(restore_filter, monkeypatch):
    from medusa_vllm import kernels
    from medusa_vllm.vllm_plugin import top_k_top_p

    monkeypatch.delenv("MEDUSA_VLLM_TOP_K_TOP_P", raising=False)
    monkeypatch.setattr(kernels, "compiled", lambda op: op == "target_probs")
    assert top_k_top_p.chosen(torch.device("cuda")) == "vllm"  # what vLLM samples from there
    assert top_k_top_p.chosen(torch.device("cpu")) == "medusa"
    assert top_k_top_p.install(torch.device("cpu"), V) is True
    assert sampling._target_probs_op is kernels.target_probs and sampling._top_k_top_p is None
    monkeypatch.setattr(kernels, "compiled", lambda op: False)  # no extension, or one without the op
    assert top_k_top_p.chosen(torch.device("cpu")) == "vllm"
    assert top_k_top_p.install(torch.device("cpu"), V) is False  # vLLM's op is a GPU's; the CPU sorts
    assert sampling._target_probs_op is None and sampling._top_k_top_p is None


def test_vllms_op_leaves_a_cpu_engine_on_the_reference(restore_filter, monkeypatch):
    from medusa_vllm.vllm_plugin import top_k_top_p

    monkeypatch.setenv("MEDUSA_VLLM_TOP_K_TOP_P", "vllm")
    assert top_k_top_p.install(torch.device("cpu"), V) is False
    assert sampling._top_k_top_p is None and sampling._target_probs_op is None


def test_a_misspelt_choice_says_what_it_takes(restore_filter, monkeypatch):
    from medusa_vllm.vllm_plugin import top_k_top_p

    monkeypatch.setenv("MEDUSA_VLLM_TOP_K_TOP_P", "sort")
    with pytest.raises(ValueError, match="'vllm'.*'triton'.*'medusa'.*'reference'"):
        top_k_top_p.install(torch.device("cpu"), V)
    monkeypatch.setenv("MEDUSA_VLLM_TOP_K_TOP_P", "reference")
    assert top_k_top_p.install(torch.device("cuda"), V) is False  # no CUDA touched: the reference stays
    assert sampling._top_k_top_p is None


def test_the_medusa_choice_installs_the_target_probs_op_on_any_device(restore_filter, monkeypatch):
    from medusa_vllm import kernels
    from medusa_vllm.vllm_plugin import top_k_top_p

    monkeypatch.setenv("MEDUSA_VLLM_TOP_K_TOP_P", "medusa")
    try:
        assert top_k_top_p.install(torch.device("cpu"), V) is True
        assert sampling._target_probs_op is kernels.target_probs and sampling._top_k_top_p is None
        x, k, p = _rows(12, seed=4)
        s = SamplingBatch(torch.full((12,), 0.7), k, p)
        got = target_probs(x, s)  # through the op
        sampling.set_target_probs(None)
        want = target_probs(x, s)  # the sort (no ties in these rows: the same tokens)
        assert torch.equal(got > 0, want > 0)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        monkeypatch.setenv("MEDUSA_VLLM_TOP_K_TOP_P", "reference")
        sampling.set_target_probs(kernels.target_probs)
        top_k_top_p.install(torch.device("cpu"), V)  # another choice takes it out again
        assert sampling._target_probs_op is None
    finally:
        sampling.set_target_probs(None)


def test_sampling_ops_names_what_it_installed(restore_filter, monkeypatch):
    from medusa_vllm import kernels, verify
    from medusa_vllm.vllm_plugin.top_k_top_p import sampling_ops

    old_walk = verify.set_rejection_walk(None)
    try:
        monkeypatch.delenv("MEDUSA_VLLM_TOP_K_TOP_P", raising=False)
        monkeypatch.delenv("MEDUSA_VLLM_REJECTION_WALK", raising=False)
        monkeypatch.setattr(kernels, "compiled", lambda op: True)
        assert sampling_ops(torch.device("cpu"), V) == {"filter": "medusa", "walk": "kernel"}
        assert sampling._target_probs_op is kernels.target_probs
        monkeypatch.setenv("MEDUSA_VLLM_TOP_K_TOP_P", "vllm")  # a GPU's op: the CPU keeps the sort
        monkeypatch.setenv("MEDUSA_VLLM_REJECTION_WALK", "tensor")
        assert sampling_ops(torch.device("cpu"), V) == {"filter": "reference", "walk": "tensor"}
        assert sampling._target_probs_op is None and sampling._top_k_top_p is None
    finally:
        verify.set_rejection_walk(old_walk)
