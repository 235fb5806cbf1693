"""The optional xformers backend (medusa_vllm.kernels.xformers_tree) against the PyTorch
reference: GPU only (xformers' Triton split-K op), several trees, query lengths and contexts in
one batch, vLLM's NHD cache layout with 16-token pages."""

from __future__ import annotations

import pytest
import torch

from medusa_vllm.kernels import reference
from medusa_vllm.kernels import testing as kt

pytest.importorskip("xformers.ops.tree_attention")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton)")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_the_reference(dtype):
    from medusa_vllm.kernels.xformers_tree import tree_attention_xformers

    gen = torch.Generator().manual_seed(5)
    masks = [kt.chain_mask(64), kt.medusa_mask(63), kt.random_tree_mask(16, gen)]
    problem = kt.make_tree_attention_problem(
        q_lens=[64, 64, 64, 16, 5, 16], ctx_lens=[300, 17, 1000, 40, 64, 1], tree_ids=[1, 1, 1, 2, 0, 2],
        masks=masks, num_q_heads=14, num_kv_heads=2, head_dim=64, block_size=16, dtype=dtype,
        device="cuda", layout="nhd", seed=3,
    )
    expected = problem.out.clone()
    reference.tree_attention_ref(expected, *problem.args()[1:], problem.scale)
    tree_attention_xformers(problem.out, *problem.args()[1:], problem.scale)
    torch.testing.assert_close(problem.out, expected, atol=2e-2, rtol=2e-2)


def test_refuses_softcap_and_other_scales():
    from medusa_vllm.kernels.xformers_tree import tree_attention_xformers

    problem = kt.make_tree_attention_problem(
        q_lens=[4], ctx_lens=[20], tree_ids=[0], masks=[kt.chain_mask(4)], num_q_heads=2,
        num_kv_heads=1, head_dim=64, block_size=16, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="soft-capping"):
        tree_attention_xformers(problem.out, *problem.args()[1:], problem.scale, 5.0)
    with pytest.raises(ValueError, match="head_dim\\^-0.5"):
        tree_attention_xformers(problem.out, *problem.args()[1:], 0.1)
