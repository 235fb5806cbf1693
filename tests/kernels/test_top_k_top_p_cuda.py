"""vLLM's top-k/top-p op on a GPU, as the adapter installs it (medusa_vllm.vllm_plugin.top_k_top_p):
its Triton kernel (8 rows and more) and its sort (fewer) keep the tokens medusa_vllm's sort
reference keeps; the sampled tree step with it installed replays in a CUDA graph, equal to the
eager step, without a host sync."""

from __future__ import annotations

import pytest
import torch

from medusa_vllm.kernels import testing as kt
from medusa_vllm.sampling import apply_top_k_top_p_ref, set_top_k_top_p

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

V = 49152  # SmolLM2's vocabulary: the size the kernel's tiles meet in serving


@pytest.fixture
def installed():
    from medusa_vllm.vllm_plugin import top_k_top_p

    old = set_top_k_top_p(None)
    assert top_k_top_p.install(torch.device("cuda"), V)
    yield top_k_top_p.vllm_top_k_top_p
    set_top_k_top_p(old)


def _rows(m: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    scale = torch.tensor([0.5, 2.0, 6.0], device="cuda")[torch.arange(m, device="cuda") % 3].unsqueeze(1)
    x = torch.randn(m, V, device="cuda", generator=g) * scale
    k = torch.tensor([V, 1, 20, V, 200, 7], device="cuda")[torch.arange(m, device="cuda") % 6]
    p = torch.tensor([1.0, 1.0, 0.9, 0.5, 0.95, 0.99, 0.3], device="cuda")[torch.arange(m, device="cuda") % 7]
    return x, k, p


@pytest.mark.parametrize("op", ["vllm", "triton"])
@pytest.mark.parametrize("m", [1, 4, 8, 32, 300])
def test_vllms_op_keeps_the_references_tokens(installed, m, op):
    from medusa_vllm.vllm_plugin.top_k_top_p import CHOICES

    x, k, p = _rows(m, seed=m)
    want = torch.isfinite(apply_top_k_top_p_ref(x.clone(), k, p))
    got = torch.isfinite(CHOICES[op](x.clone(), k, p))
    # Two differences are allowed. A token tied with the k-th largest logit: the reference keeps
    # every tie (as vLLM's sort path: logits >= the k-th), the Triton kernel may not. And top-p's boundary in
    # a flat row, where float32 sums of thousands of masses round differently (on an H200,
    # code 746342e: 31 of the 300 rows, all flat ones (logits * 0.5) with top-p alone, by 1 to
    # 8 tokens of 49,152, each about 2e-5 of the mass). Those must hold less than 1e-3 of the
    # row's probability.
    kth = torch.gather(x.sort(dim=-1, descending=True).values, 1, (k.clamp(max=V) - 1).unsqueeze(1))
    tie = (x == kth) & (k < V).unsqueeze(1)
    off = (got != want) & ~tie
    mass = (torch.softmax(x, dim=-1) * off).sum(dim=1)
    assert float(mass.max()) < 1e-3, f"tokens {off.sum(dim=1).tolist()} of mass {mass.tolist()} differ"
    assert torch.equal(got.sum(dim=1) >= 1, torch.ones_like(got[:, 0]))


def test_sampled_step_with_vllms_op_replays_in_a_graph_without_syncs(installed):
    step = kt.sampled_step_problem(V)
    eager, captured = kt.eager_then_graphed(step)
    for e, c in zip(eager, captured):
        assert torch.equal(e, c)
    assert int(eager[1].ne(-1).sum()) > 0  # some drafts were accepted
