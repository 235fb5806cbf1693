"""target_probs on a GPU (csrc/target_probs_cuda.cu): the same thresholds and tie ranks as the CPU
op (integer mass sums), about the tokens vLLM's own top-k/top-p kernel keeps, and the
sampled tree step with the op installed (MEDUSA_VLLM_TOP_K_TOP_P=medusa) replaying in a CUDA
graph without a host sync."""

from __future__ import annotations

import pytest
import torch

from medusa_vllm import kernels, sampling
from medusa_vllm.kernels import testing as kt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

V = 49152  # SmolLM2's vocabulary


def _rows(m: int, seed: int, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    idx = torch.arange(m, device="cuda")
    scale = torch.tensor([0.5, 2.0, 6.0], device="cuda")[idx % 3].unsqueeze(1)
    x = (torch.randn(m, V, device="cuda", generator=g) * scale).to(dtype)
    temp = torch.tensor([1.0, 0.8, 0.3, 1.7], device="cuda")[idx % 4]
    k = torch.tensor([V, 1, 20, V, 200, 7], dtype=torch.int32, device="cuda")[idx % 6]
    p = torch.tensor([1.0, 1.0, 0.9, 0.5, 0.95, 0.99, 0.3], device="cuda")[idx % 7]
    min_p = torch.tensor([0.0, 0.0, 0.05, 0.0, 0.2], device="cuda")[idx % 5]
    return x, temp, k, p, min_p


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 7, 300])
def test_cuda_op_matches_the_cpu_op_and_the_reference(m, dtype):
    x, temp, k, p, min_p = _rows(m, seed=m, dtype=dtype)
    got = kernels.target_probs(x, temp, k, p, min_p)
    cpu = kernels.target_probs(x.cpu(), temp.cpu(), k.cpu(), p.cpu(), min_p.cpu())
    # expf on the GPU and std::exp on the CPU may differ by an ulp: the fixed-point masses of a
    # token can then differ by one unit, which moves a boundary only at an exact tie of sums
    assert torch.equal(got.cpu() > 0, cpu > 0)
    torch.testing.assert_close(got.cpu(), cpu, rtol=1e-5, atol=1e-7)
    ref = kernels.target_probs_ref(x, temp, k, p, min_p)
    assert torch.equal(got > 0, ref > 0)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("m", [8, 64, 300])
def test_keeps_about_the_tokens_vllms_kernel_keeps(m):
    """target_probs (opt-in on a GPU, MEDUSA_VLLM_TOP_K_TOP_P=medusa) against vLLM's Triton
    top-k/top-p kernel, the GPU default filter. Both keep, of equal logits at a boundary, the
    lowest token ids first. vLLM's kernel finds its top-p ties again by a float round trip
    (log(prob * sum) + max within 1e-9 of the logit) and keeps the whole tie group where that
    misses (H100, ca4aa24: 38 tokens, 0.7% of a flat row's mass, at p = 0.3). At 8 rows the
    tokens that differ were one tie group at the boundary (H100, d0a40bc); at 64 and 300 rows
    they were not (the details were lost with a cut-off call), which is why target_probs is not
    the GPU default. What is asserted: each row's two distributions are within 5% in total
    variation, and at 8 rows the tie-group rule; the rows that differ are printed (not yet run
    on a GPU in this form)."""
    pytest.importorskip("vllm")
    from medusa_vllm.vllm_plugin.top_k_top_p import triton_top_k_top_p

    x, temp, k, p, _ = _rows(m, seed=100 + m)
    z = x.float() / temp.unsqueeze(1)
    vllm_probs = torch.softmax(triton_top_k_top_p(z.clone(), k, p), dim=-1)
    probs = kernels.target_probs(x, temp, k, p, None)
    want, got = vllm_probs > 0, probs > 0
    off = got != want
    tv = 0.5 * (probs - vllm_probs).abs().sum(dim=1)
    for r in off.any(dim=1).nonzero()[:, 0].tolist():
        tied = z[r, off[r]].unique()
        print(f"m={m} row {r}: k={int(k[r])} p={float(p[r]):.2f} {int(off[r].sum())} tokens differ "
              f"({int(got[r].sum())} kept here, {int(want[r].sum())} by vLLM), logits {tied[:6].tolist()}, "
              f"total variation {float(tv[r]):.2e}")
    assert float(tv.max()) < 0.05, f"largest total variation {float(tv.max()):.3e}"
    if m == 8:
        for r in off.any(dim=1).nonzero()[:, 0].tolist():
            tied = z[r, off[r]].unique()
            lowest = min(float(z[r, got[r]].min()), float(z[r, want[r]].min()))
            assert tied.numel() == 1 and float(tied[0]) == lowest, \
                f"row {r}: the tokens that differ hold logits {tied[:8].tolist()}, not one tie at the boundary {lowest}"


def test_sampled_step_with_the_op_replays_in_a_graph_without_syncs():
    step = kt.sampled_step_problem(V, logits_dtype=torch.bfloat16)

    old_filter = sampling.set_top_k_top_p(None)
    old = sampling.set_target_probs(None)
    try:
        reference = step()  # the sort path: the same tokens (no tie at these boundaries)
        sampling.set_target_probs(kernels.target_probs)
        eager, captured = kt.eager_then_graphed(step)
    finally:
        sampling.set_target_probs(old)
        sampling.set_top_k_top_p(old_filter)
    for e, c, r in zip(eager, captured, reference):
        assert torch.equal(e, c)
        assert torch.equal(e, r)
    assert int(eager[1].ne(-1).sum()) > 0  # some drafts were accepted
