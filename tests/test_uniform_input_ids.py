"""A uniform step's input ids under asynchronous scheduling: medusa_vllm's two slice copies
against vLLM 0.26's own ``GPUModelRunner._prepare_input_ids`` (its per-token index scatter), run
on the same runner state."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from vllm.v1.core.sched.output import SchedulerOutput  # noqa: E402
from vllm.v1.utils import CpuGpuBuffer  # noqa: E402
from vllm.v1.worker.gpu_model_runner import GPUModelRunner  # noqa: E402

from medusa_vllm.vllm_plugin.runner import MedusaRunnerMixin  # noqa: E402

MAX_REQS, MAX_TOKENS = 8, 256


def state(prev_positions, drafts_per_req, prev_width: int, seed: int = 0):
    """A runner's state after a step: the tokens each request emitted last and the drafts proposed
    for it (``prev_width`` a row), and this step's scheduled drafts per request."""
    g = torch.Generator().manual_seed(seed)
    b = len(prev_positions)
    req_ids = [f"r{i}" for i in range(b)]
    input_ids = CpuGpuBuffer(MAX_TOKENS, dtype=torch.int32, device=torch.device("cpu"))
    input_ids.cpu.copy_(torch.randint(0, 1000, (MAX_TOKENS,), generator=g, dtype=torch.int32))
    input_ids.gpu.fill_(-7)  # what a step must overwrite
    prev = CpuGpuBuffer(MAX_REQS, dtype=torch.int64, device=torch.device("cpu"))
    prev.np[:b] = prev_positions
    runner = SimpleNamespace(
        input_batch=SimpleNamespace(
            prev_sampled_token_ids=torch.randint(0, 1000, (MAX_REQS, 1), generator=g, dtype=torch.int32),
            req_ids=req_ids,
        ),
        _draft_token_ids=torch.randint(0, 1000, (MAX_REQS, prev_width), generator=g),
        prev_num_spec_tokens=prev_width,
        prev_positions=prev,
        input_ids=input_ids,
        enable_prompt_embeds=False,
        device=torch.device("cpu"),
        arange_np=np.arange(MAX_TOKENS, dtype=np.int64),  # vLLM's immutable [0, 1, 2, ...]
    )
    spec = {r: list(range(n)) for r, n in zip(req_ids, drafts_per_req)}
    so = SimpleNamespace(scheduled_spec_decode_tokens=spec)
    tokens = [1 + n for n in drafts_per_req]
    return runner, so, b, sum(tokens), np.cumsum(tokens).astype(np.int32)


def both(prev_positions, drafts_per_req, prev_width):
    """(medusa_vllm took the step, its input ids, vLLM's input ids) from equal states."""
    ours, so, b, total, cu = state(prev_positions, drafts_per_req, prev_width)
    theirs, *_ = state(prev_positions, drafts_per_req, prev_width)
    took = MedusaRunnerMixin._medusa_uniform_input_ids(ours, so, b, total)
    GPUModelRunner._prepare_input_ids(theirs, so, b, total, cu)
    return took, ours.input_ids.gpu[:total], theirs.input_ids.gpu[:total]


@pytest.mark.parametrize("b,q,width", [(1, 64, 63), (3, 4, 3), (8, 16, 63), (5, 8, 31)])
def test_uniform_step_writes_what_vllm_writes(b, q, width):
    # width > q - 1: the first step after a change to a smaller tree verifies the earlier
    # tree's drafts cut to this count
    took, ours, theirs = both(list(range(b)), [q - 1] * b, width)
    assert took
    assert torch.equal(ours, theirs)
    assert (ours != -7).all()


@pytest.mark.parametrize("prev_positions,drafts,width", [
    ([1, 0, 2], [3, 3, 3], 3),  # rows reordered since the step before
    ([0, -1, 2], [3, 0, 3], 3),  # a new request
    ([0, 1, 2], [3, 2, 3], 3),  # unequal draft counts
    ([0, 1, 2], [3, 3, 3], 2),  # fewer drafts proposed than scheduled
    ([0, 1, 2], [0, 0, 0], 3),  # no drafts: vLLM's own fast path
])
def test_other_steps_are_left_to_vllm(prev_positions, drafts, width):
    runner, so, b, total, _ = state(prev_positions, drafts, width)
    assert not MedusaRunnerMixin._medusa_uniform_input_ids(runner, so, b, total)
    assert (runner.input_ids.gpu == -7).all()  # nothing written


def test_scheduler_output_field_is_vllms():
    # the field the check reads is SchedulerOutput's own
    assert "scheduled_spec_decode_tokens" in SchedulerOutput.__dataclass_fields__
