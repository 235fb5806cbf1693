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

``MEDUSA_VLLM_REJECTION_WALK`` picks one; unset: ``kernel`` on a CPU, ``tensor`` on a GPU (the
CUDA kernel has run through tests/kernels/cuda_emulation, not yet on a GPU). An A/B in one
benchmark run: ``medusa-v2:default-63+MEDUSA_VLLM_REJECTION_WALK=kernel``.
"""

from __future__ import annotations

import os

import torch

from medusa_vllm import verify

CHOICES = ("kernel", "tensor")


def chosen(device: torch.device) -> str:
    """The walk ``MEDUSA_VLLM_REJECTION_WALK`` names, or the device's default."""
    choice = os.environ.get("MEDUSA_VLLM_REJECTION_WALK", "") or ("tensor" if device.type == "cuda" else "kernel")
    if choice not in CHOICES:
        raise ValueError(f"MEDUSA_VLLM_REJECTION_WALK={choice!r}: expected 'kernel' (medusa_vllm's "
                         f"rejection_walk op) or 'tensor' (the walk in tensor ops)")
    return choice


def install(device: torch.device) -> str:
    """Installs the chosen walk for medusa_vllm's verification; returns its name."""
    from medusa_vllm import kernels

    choice = chosen(device)
    verify.set_rejection_walk(kernels.rejection_walk if choice == "kernel" else None)
    return choice
