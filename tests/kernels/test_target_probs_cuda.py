"""target_probs on a GPU (csrc/target_probs_cuda.cu): the same thresholds as the CPU op (integer
mass sums), the tokens vLLM's own top-k/top-p kernel keeps, and the sampled tree step with the
op installed (MEDUSA_VLLM_TOP_K_TOP_P=medusa) replaying in a CUDA graph without a host sync."""

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
def test_keeps_the_tokens_vllms_kernel_keeps(m):
    pytest.importorskip("vllm")
    from medusa_vllm.vllm_plugin.top_k_top_p import triton_top_k_top_p

    x, temp, k, p, _ = _rows(m, seed=100 + m)
    z = x.float() / temp.unsqueeze(1)
    want = torch.isfinite(triton_top_k_top_p(z.clone(), k, p))
    got = kernels.target_probs(x, temp, k, p, None) > 0
    # Ties: target_probs keeps every token tied with the row's boundary (its smallest kept
    # logit), vLLM's kernel may keep part of such a tie. bf16 logits tie in groups: on an H100
    # (code 084ea7f) the tokens that differed held up to 8.8% of a flat row's mass, which is why
    # the op is not the default. Every other difference (float32 sums rounding apart) must hold
    # under 1e-3 of the row's probability, and vLLM's kernel keeps no tie member we drop.
    bound = torch.where(got, z, float("inf")).amin(dim=1, keepdim=True)
    tied = z == bound
    stray = (got != want) & ~tied
    mass = (torch.softmax(z, dim=-1) * stray).sum(dim=1)
    assert float(mass.max()) < 1e-3, f"tokens {stray.sum(dim=1).tolist()} of mass {mass.tolist()} differ"
    tie_mass = (torch.softmax(z, dim=-1) * ((got != want) & tied)).sum(dim=1)
    print(f"m={m}: rows with a partial tie {int((tie_mass > 0).sum())}, largest tie mass {float(tie_mass.max()):.2e}")


def test_sampled_step_with_the_op_replays_in_a_graph_without_syncs():
    step = kt.sampled_step_problem(V, logits_dtype=torch.bfloat16)

    old_filter = sampling.set_top_k_top_p(None)
    old = sampling.set_target_probs(kernels.target_probs)
    try:
        torch.cuda.set_sync_debug_mode("error")
        try:
            eager = step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        sampling.set_target_probs(None)
        reference = step()  # the sort path: the same tokens (no tie at these boundaries)
        sampling.set_target_probs(kernels.target_probs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # warm up outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        graph.replay()
        torch.cuda.synchronize()
    finally:
        sampling.set_target_probs(old)
        sampling.set_top_k_top_p(old_filter)
    for e, c, r in zip(eager, captured, reference):
        assert torch.equal(e, c)
        assert torch.equal(e, r)
    assert int(eager[1].ne(-1).sum()) > 0  # some drafts were accepted
