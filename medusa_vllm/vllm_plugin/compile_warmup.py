"""vLLM's compiled helper of asynchronous speculative decoding, compiled at start-up.

With asynchronous scheduling, vLLM 0.26's V1 runner corrects each step's token counts with
``update_num_computed_tokens_for_batch_change``, a ``torch.compile(dynamic=True)`` function of
the batch's requests ``n`` and the previous step's ``m``. Dynamo compiles it on first use and
again the first time ``n`` or ``m`` is 1 (sizes 0 and 1 are always specialized) and the first
time ``n != m`` (its first graph unified equal sizes): five compiles, each a host stall of
0.2-1.4 s on this repository's CPU and about 0.45 s on an H100
(``benchmarks/results/step_log_h100_fa59925.json``: a tree step of one request spent 462 ms in
vLLM's input preparation, 0.1 ms of it in medusa_vllm's plan). They land in the first minutes of
serving, when batch sizes first change. :func:`warm_batch_change_compiles` makes all five at
start-up, on copies of the runner's own buffers (same dtypes, sizes and views as the real call),
so no step meets a compile.
"""

from __future__ import annotations

import torch

# (requests this step, requests the step before): first compile (equal sizes), then the
# specializations of 1 on either side and of unequal sizes
COMBOS = ((2, 2), (1, 1), (1, 2), (2, 1), (2, 3))


def warm_batch_change_compiles(num_computed_tokens: torch.Tensor, num_accepted_tokens: torch.Tensor,
                               prev_positions: torch.Tensor, prev_num_draft_tokens: torch.Tensor,
                               combos: tuple[tuple[int, int], ...] = COMBOS) -> int:
    """Calls vLLM's function once per ``combos`` entry, as ``GPUModelRunner._prepare_inputs``
    does, on clones of the runner's buffers: ``num_computed_tokens`` [R] int32 (passed whole),
    ``num_accepted_tokens`` [R] int32 and ``prev_positions`` [R] int64 (sliced to n),
    ``prev_num_draft_tokens`` [R] int32 (whole); the previous step's valid counts [m] int32 and
    the CPU values [n] int32 are fresh tensors there too. Returns the number of calls made
    (combos needing more requests than the buffers hold are left out)."""
    from vllm.v1.spec_decode.utils import (
        update_num_computed_tokens_for_batch_change as fn,
    )

    computed, accepted = num_computed_tokens.clone(), num_accepted_tokens.clone()
    positions, drafts = prev_positions.clone().zero_(), prev_num_draft_tokens.clone()
    calls = 0
    for n, m in combos:
        if max(n, m) > computed.shape[0]:
            continue
        valid = torch.ones(m, dtype=torch.int32, device=computed.device)
        cpu_values = torch.zeros(n, dtype=torch.int32, device=computed.device)
        fn(computed, accepted[:n], positions[:n], valid, drafts, cpu_values)
        calls += 1
    return calls
