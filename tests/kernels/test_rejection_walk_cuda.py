"""rejection_walk on a GPU (csrc/rejection_walk_cuda.cu): the CPU op's paths and tokens at
SmolLM2's vocabulary (with and without top-k / top-p / min-p), and the sampled tree step with
the op installed replaying in a CUDA graph without a host sync."""

from __future__ import annotations

import pytest
import torch

from medusa_vllm import kernels, sampling, verify
from medusa_vllm.kernels import testing as kt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

V = 49152  # SmolLM2's vocabulary


@pytest.mark.parametrize("filters", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("batch", [1, 64, 300])
def test_cuda_op_matches_the_cpu_op(batch, dtype, filters):
    args = kt.walk_problem(batch, V, seed=batch, device="cuda", logits_dtype=dtype, filters=filters)
    got = kernels.rejection_walk(*args)
    cpu = kernels.rejection_walk(*(None if a is None else a.cpu() for a in args))
    # (expf on the GPU and std::exp on the CPU may differ by an ulp: a decision flips only where
    # a uniform lies within that of its threshold)
    for name, a, b in zip(("accepted", "last_node", "final"), got, cpu):
        assert torch.equal(a.cpu(), b), f"{name} differs at {(a.cpu() != b).reshape(batch, -1).any(1).nonzero()[:, 0].tolist()}"
    if batch == 300:
        assert set((got[0] >= 0).sum(1).tolist()) >= {0, 1, 2, 3}


@pytest.mark.parametrize("filtered", [False, True])
def test_sampled_step_with_the_op_replays_in_a_graph(filtered):
    """(filtered: top-k 50, top-p 0.95, with target_probs as the filter, so the op walks it)"""
    old = verify.set_rejection_walk(kernels.rejection_walk)
    old_filter = sampling.set_target_probs(kernels.target_probs)
    try:
        step = kt.sampled_step_problem(V, filtered=filtered, logits_dtype=torch.bfloat16)
        eager, replayed = kt.eager_then_graphed(step)
    finally:
        verify.set_rejection_walk(old)
        sampling.set_target_probs(old_filter)
    for a, b in zip(eager, replayed):
        assert torch.equal(a, b)
    tensor_walk = step()  # (the tensor walk: the same accepted paths)
    assert torch.equal(tensor_walk[1], eager[1])
