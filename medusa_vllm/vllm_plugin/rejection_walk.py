"""Which walk verifies a sampled tree step.

``kernel``: medusa_vllm's ``rejection_walk`` op (csrc/rejection_walk.h), one kernel a step: a
block per request walks its tree, reading each level's row once for its max and normaliser
(with top-k / top-p / min-p: target_probs' radix-select passes) and the stopping row twice for
the final draw. ``tensor``: the walk of
:func:`medusa_vllm.verify.verify_rejection` in tensor ops, about 200 small kernels a step
(the fixed-shape sampled step's leaf ops, 63-node tree: 258 against 43 with the op, CPU
profile), each level's whole [B, V] distribution written and read back. Both accept the same
paths; their final draws are inverse CDFs of the same distribution over different sums
(tests/kernels/test_rejection_walk.py). The op filters as medusa_vllm's ``target_probs`` does,
so a step with a filter takes it only where that is the installed filter
(``MEDUSA_VLLM_TOP_K_TOP_P=medusa``); with vLLM's filter such steps keep the tensor walk.

``MEDUSA_VLLM_REJECTION_WALK`` picks one (default ``kernel``). Measured on an H100 (code
ca4aa24, CUDA-graphed verify step of ``default-63`` at 1 / 8 / 32 / 64 requests,
benchmarks/results/verify_step_cost_h100_{walk,tensor}_ca4aa24.json): without a filter 735 /
851 / 1,144 / 1,556 µs with the tensor walk, 271 / 351 / 563 / 734 µs with the op; with top-p
0.95 and target_probs as the filter 383 / 512 / 779 / 1,092 µs. An A/B in one benchmark run:
``medusa-v2:default-63+MEDUSA_VLLM_REJECTION_WALK=tensor``.
"""

from __future__ import annotations

import logging
import os

from medusa_vllm import verify

CHOICES = ("kernel", "tensor")
logger = logging.getLogger(__name__)


def chosen() -> str:
    """The walk ``MEDUSA_VLLM_REJECTION_WALK`` names (``kernel`` when unset)."""
    choice = os.environ.get("MEDUSA_VLLM_REJECTION_WALK", "") or "kernel"
    if choice not in CHOICES:
        raise ValueError(f"MEDUSA_VLLM_REJECTION_WALK={choice!r}: expected 'kernel' (medusa_vllm's "
                         f"rejection_walk op) or 'tensor' (the walk in tensor ops)")
    return choice


def install() -> str:
    """Installs the chosen walk for medusa_vllm's verification; returns its name. ``kernel``
    without the compiled op (no extension, or one built before the op) installs ``tensor``: the
    op's PyTorch reference is slower than the tensor walk."""
    from medusa_vllm import kernels

    choice = chosen()
    if choice == "kernel" and not kernels.compiled("rejection_walk"):
        logger.warning("medusa_vllm: the rejection_walk op is not compiled (%s); sampled steps use the walk "
                       "in tensor ops. Rebuild the extension (pip install --no-build-isolation -e .) for it",
                       kernels.extension_error() or "an extension built before the op")
        choice = "tensor"
    verify.set_rejection_walk(kernels.rejection_walk if choice == "kernel" else None)
    return choice
