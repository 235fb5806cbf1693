"""The target distribution's top-k/top-p filter: medusa_vllm's target_probs op, or vLLM's own.

A sampled tree step filters the target logits of the B rows it walks at each tree level
(``medusa_vllm.sampling.target_probs``), five times a step for the 63-node tree. The
reference filter sorts every row over the vocabulary. On an H100 (code 4359400, V2 runner,
temperature 0.8, top-p 0.95) sampled 63-node steps took about 1.0 / 1.7 / 3.3 ms longer than
greedy ones at batch 1 / 8 / 32 (from the runs' tokens/s and acceptance). vLLM 0.26 filters
its own samples with ``apply_top_k_top_p``: a Triton top-k/top-p kernel without a sort from 8
rows on, PyTorch's sort below. With that op installed, the distribution medusa_vllm verifies
against is the one vLLM samples from without speculation, made by the same code, and the
sampled step sorts only where vLLM's own sampler would; medusa_vllm's ``target_probs`` op
gives the sort's distribution in one kernel (below).

``MEDUSA_VLLM_TOP_K_TOP_P`` picks the filter:
- ``vllm`` (the default on a GPU): vLLM's op with its dispatch (CUDA only: on a CPU vLLM's op
  is the same sort as the reference, and syncs for top-k alone, so nothing is installed there).
- ``medusa`` (the default on a CPU where the extension has the op compiled; opt-in on a GPU):
  medusa_vllm's own ``target_probs`` op on any device: temperature, min-p, top-k, top-p and
  the softmax in one kernel, radix selects instead of a sort or vLLM's pivot search. It keeps
  exactly the tokens of the sort (the textbook rule, vLLM's own below 8 rows); of equal logits
  at a boundary the fewest, lowest token ids that reach p, computed in integers. With it a
  filtered sampled step's walk is one kernel too (``rejection_walk``, which filters the same
  way): on an H100 (code ca4aa24, ``default-63``, 1 / 8 / 32 / 64 requests, top-p 0.95) 383 /
  512 / 779 / 1,092 µs a verify step, against 1,388 / 1,961 / 2,444 / 2,958 µs with vLLM's op
  and the tensor walk (fourteenth session's H100). Why it is not the GPU default: from 8 rows
  on vLLM samples through its Triton kernel (Qrita's pivot search, float32 sums), and on an
  H100 (code d0a40bc) that kernel kept other tokens than target_probs in the 64- and 300-row
  cases of tests/kernels/test_target_probs_cuda.py::test_keeps_about_the_tokens_vllms_kernel_keeps,
  beyond the one tie group at the boundary that test allowed (the 8-row case passed; the
  failures' details were lost: the call ran out of device time before pytest printed them).
  Verifying against target_probs there is lossless with respect to the exact top-k/top-p
  distribution, not to the one vLLM's kernel samples from.
- ``triton`` (CUDA only): vLLM's Triton kernel for any number of rows (below 8 rows vLLM sorts,
  and a batch-1 sampled step filters 1 row five times; the two differ only where float32 sums
  round differently, see tests/kernels/test_top_k_top_p_cuda.py).
- ``reference``: medusa_vllm's sort.
An A/B of them in one benchmark run: ``medusa-v2:default-63+MEDUSA_VLLM_TOP_K_TOP_P=medusa``.
"""

from __future__ import annotations

import os

import torch

from medusa_vllm import sampling


def vllm_top_k_top_p(x: torch.Tensor, k: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """[M, V] float32 logits, [M] k (vocab = off), [M] p (1 = off) -> x masked with -inf
    outside each row's top-k, then top-p (vLLM's sampler's op, its dispatch by row count)."""
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

    return apply_top_k_top_p(x, k, p)


def triton_top_k_top_p(x: torch.Tensor, k: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """As :func:`vllm_top_k_top_p`, always through vLLM's Triton kernel (no sort at any row count)."""
    from vllm.v1.sample.ops.topk_topp_triton import apply_top_k_top_p_triton

    return apply_top_k_top_p_triton(x, k, p)


CHOICES = {"vllm": vllm_top_k_top_p, "triton": triton_top_k_top_p, "reference": None, "medusa": None}


def chosen(device: torch.device | None = None) -> str:
    """The filter ``MEDUSA_VLLM_TOP_K_TOP_P`` names; when unset ``vllm`` on a CUDA device (the
    distribution vLLM samples from there, made by its own op), elsewhere ``medusa`` where the
    target_probs op is compiled (vLLM's CPU path is the sort, the rule target_probs computes)."""
    choice = os.environ.get("MEDUSA_VLLM_TOP_K_TOP_P", "")
    if choice:
        return choice
    if device is not None and device.type == "cuda":
        return "vllm"
    from medusa_vllm import kernels

    return "medusa" if kernels.compiled("target_probs") else "vllm"


def install(device: torch.device, vocab: int) -> bool:
    """Filter medusa_vllm's target distributions with the op :func:`chosen` names; True when
    one is installed. ``medusa`` (medusa_vllm's target_probs) installs on any device; vLLM's
    ops only on a CUDA device (elsewhere nothing changes and False comes back). vLLM's Triton
    kernel keeps a per-device scratch buffer that grows with the rows of a call: it is made
    here, at its largest (one row per SM), so that no CUDA graph capture allocates or replaces it."""
    choice = chosen(device)
    if choice not in CHOICES:
        raise ValueError(f"MEDUSA_VLLM_TOP_K_TOP_P={choice!r}: expected 'vllm' (vLLM's op on a GPU, "
                         f"the default there), 'triton' (its Triton kernel at any row count), 'medusa' "
                         f"(medusa_vllm's target_probs op, any device; the CPU default where compiled) "
                         f"or 'reference' (medusa_vllm's sort)")
    if choice == "medusa":
        from medusa_vllm import kernels

        sampling.set_top_k_top_p(None)
        sampling.set_target_probs(kernels.target_probs)
        return True
    sampling.set_target_probs(None)
    if device.type != "cuda" or CHOICES[choice] is None:
        return False
    from vllm.triton_utils import HAS_TRITON

    if choice == "triton" and not HAS_TRITON:
        raise RuntimeError("MEDUSA_VLLM_TOP_K_TOP_P=triton: this vLLM has no Triton; use 'vllm'")
    sampling.set_top_k_top_p(CHOICES[choice])
    if HAS_TRITON:
        from vllm.utils.platform_utils import num_compute_units

        rows = num_compute_units(device.index)
        triton_top_k_top_p(torch.zeros(rows, vocab, dtype=torch.float32, device=device),
                           torch.full((rows,), vocab, dtype=torch.int32, device=device), torch.ones(rows, device=device))
    return True


def sampling_ops(device: torch.device, vocab: int) -> dict[str, str]:
    """Installs the sampled step's target filter and rejection walk (an engine's runner calls it
    once); returns their names for ``medusa_stats()``: ``{"filter": "medusa" | "vllm" | "triton" |
    "reference", "walk": "kernel" | "tensor"}`` (``reference``: the sort, also where the chosen op
    does not apply, e.g. vLLM's on a CPU)."""
    from medusa_vllm.vllm_plugin import rejection_walk

    filt = chosen(device) if install(device, vocab) else "reference"
    return {"filter": filt, "walk": rejection_walk.install()}
