"""Kernels of medusa_vllm: tree-masked attention over vLLM's paged KV cache and the
accepted-path KV move, as torch.ops.medusa_vllm.* (compiled in csrc/).

    tree_attention(out, q, k_cache, v_cache, block_table, seq_lens, query_start_loc,
                   tree_masks, req_tree_ids, scale, softcap=0.0, num_splits=0)
    move_accepted_kv(k_caches, v_caches, slot_mapping, query_start_loc, accepted)
    keyed_uniforms(keys, n) -> [B, n] float32 (the sampled tree step's random numbers)
    target_probs(logits, temperature, top_k, top_p, min_p) -> [M, V] float32 (the filtered
                 target distribution: temperature, min-p, top-k, top-p, softmax; no sort)
    rejection_walk(logits, row_of_node, children, drafts, valid, temperature, top_k, top_p, min_p,
                   accept_u, final_u)
                 -> (accepted, last_node, final) (a sampled tree step's lossless walk, one op)

The wrappers check tensor metadata (no host syncs) and call the op. Without the compiled
extension the ops run the PyTorch references (slow) after one warning. Conventions: see
csrc/paged_kv.h and medusa_vllm/kernels/reference.py.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence

import torch

from medusa_vllm.kernels import _registry
from medusa_vllm.kernels.masks import MAX_TREE_QUERIES, num_mask_words, pack_tree_masks, unpack_tree_masks
from medusa_vllm.kernels.reference import (
    keyed_uniforms_ref,
    move_accepted_kv_ref,
    rejection_walk_ref,
    target_probs_ref,
    tree_attention_ref,
)

__all__ = [
    "tree_attention",
    "move_accepted_kv",
    "keyed_uniforms",
    "target_probs",
    "rejection_walk",
    "have_extension",
    "extension_error",
    "pack_tree_masks",
    "unpack_tree_masks",
    "tree_attention_ref",
    "move_accepted_kv_ref",
    "keyed_uniforms_ref",
    "target_probs_ref",
    "rejection_walk_ref",
]

_REGISTRATION = _registry.register()
# (an extension built before keyed_uniforms existed loads without it: the reference serves)
_KEYED_OP = _registry._op_exists("keyed_uniforms")
_TARGET_PROBS_OP = _registry._op_exists("target_probs")
_WALK_OP = _registry._op_exists("rejection_walk")
MAX_WALK_CHILDREN = 64  # csrc/rejection_walk.h: kMaxChildren
CUDA_DTYPES = (torch.float16, torch.bfloat16)
CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CUDA_HEAD_DIMS = (64, 128)


def have_extension() -> bool:
    """True when the compiled kernels (medusa_vllm._C) are in use."""
    return _REGISTRATION.have_extension


def compiled(op: str) -> bool:
    """True when torch.ops.medusa_vllm.<op> runs a compiled kernel, not the PyTorch reference
    (no extension, or one built before the op existed)."""
    return have_extension() and _registry._op_exists(op)


def extension_error() -> str | None:
    """Why the compiled extension is not in use, or None when it is."""
    if _REGISTRATION.error is None:
        return None
    return f"medusa_vllm._C is not available ({_REGISTRATION.error}); {_registry.BUILD_HINT}"


@functools.cache
def _warn_fallback_once() -> None:
    warnings.warn(
        f"{extension_error()}. Falling back to the slow PyTorch reference kernels.",
        RuntimeWarning,
        stacklevel=3,
    )


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_kv_view(t: torch.Tensor, name: str) -> None:
    _require(t.dim() == 4, f"{name} must be a 4-D view [num_blocks, block_size, num_kv_heads, head_dim], "
             f"got shape {tuple(t.shape)}")
    # Any strides on the CPU (vLLM's CPU_ATTN stores K transposed per block); CUDA copies 16-byte rows.
    _require(t.device.type != "cuda" or t.stride(-1) == 1,
             f"{name} must have unit stride on head_dim on CUDA, got strides {t.stride()}")


def _check_index(t: torch.Tensor, name: str, dtype: torch.dtype, ndim: int, device: torch.device) -> None:
    _require(t.dim() == ndim, f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    _require(t.dtype == dtype, f"{name} must be {dtype}, got {t.dtype}")
    _require(t.device == device, f"{name} must be on {device} like the other inputs, got {t.device}")
    _require(t.numel() == 0 or t.stride(-1) == 1, f"{name} must be contiguous in its last dimension")


def _check_tree_attention(out, q, k_cache, v_cache, block_table, seq_lens, query_start_loc,
                          tree_masks, req_tree_ids) -> None:
    _require(q.dim() == 3, f"q must be 3-D [num_tokens, num_q_heads, head_dim], got shape {tuple(q.shape)}")
    _require(out.shape == q.shape, f"out must have q's shape {tuple(q.shape)}, got {tuple(out.shape)}")
    _require(q.stride(-1) == 1 and out.stride(-1) == 1, "q and out must be contiguous in head_dim")
    _check_kv_view(k_cache, "k_cache")
    _check_kv_view(v_cache, "v_cache")
    _require(k_cache.shape == v_cache.shape, f"k_cache {tuple(k_cache.shape)} and v_cache "
             f"{tuple(v_cache.shape)} must have the same shape")
    dtypes = CUDA_DTYPES if q.device.type == "cuda" else CPU_DTYPES
    _require(q.dtype in dtypes, f"q must be one of {dtypes} on {q.device.type}, got {q.dtype}")
    _require(out.dtype == q.dtype and k_cache.dtype == q.dtype and v_cache.dtype == q.dtype,
             f"q, out, k_cache, v_cache must share one dtype, got {q.dtype}, {out.dtype}, "
             f"{k_cache.dtype}, {v_cache.dtype}")
    _require(out.device == q.device and k_cache.device == q.device and v_cache.device == q.device,
             "q, out, k_cache and v_cache must be on one device")
    head_dim, num_q_heads, num_kv_heads = q.shape[2], q.shape[1], k_cache.shape[2]
    _require(k_cache.shape[3] == head_dim, f"k_cache head_dim {k_cache.shape[3]} != q head_dim {head_dim}")
    _require(num_q_heads % num_kv_heads == 0,
             f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if q.device.type == "cuda":
        _require(head_dim in CUDA_HEAD_DIMS, f"head_dim must be one of {CUDA_HEAD_DIMS} on CUDA, got {head_dim}")
    _check_index(block_table, "block_table", torch.int32, 2, q.device)
    _check_index(seq_lens, "seq_lens", torch.int32, 1, q.device)
    _check_index(query_start_loc, "query_start_loc", torch.int32, 1, q.device)
    _check_index(req_tree_ids, "req_tree_ids", torch.int32, 1, q.device)
    _check_index(tree_masks, "tree_masks", torch.int64, 3, q.device)
    num_requests = seq_lens.shape[0]
    _require(query_start_loc.shape[0] == num_requests + 1,
             f"query_start_loc must have num_requests + 1 = {num_requests + 1} entries, got {query_start_loc.shape[0]}")
    _require(req_tree_ids.shape[0] == num_requests, f"req_tree_ids must have {num_requests} entries")
    _require(block_table.shape[0] >= num_requests, f"block_table needs >= {num_requests} rows")
    q_max = tree_masks.shape[1]
    _require(1 <= q_max <= MAX_TREE_QUERIES, f"tree_masks Q_MAX = {q_max} must be in [1, {MAX_TREE_QUERIES}]")
    _require(tree_masks.shape[2] == num_mask_words(q_max),
             f"tree_masks must be [num_trees, Q_MAX, ceil(Q_MAX / 64)], got {tuple(tree_masks.shape)}")


def validate_tree_metadata(seq_lens: torch.Tensor, query_start_loc: torch.Tensor, tree_masks: torch.Tensor,
                           req_tree_ids: torch.Tensor) -> None:
    """Host-syncing value checks (q_len <= Q_MAX, seq_len >= q_len, tree ids in range). The CPU
    kernel does them anyway; on CUDA the kernel writes NaN rows instead of raising."""
    qsl = query_start_loc.tolist()
    q_max, num_trees = tree_masks.shape[1], tree_masks.shape[0]
    for b, (seq_len, tree) in enumerate(zip(seq_lens.tolist(), req_tree_ids.tolist())):
        q_len = qsl[b + 1] - qsl[b]
        _require(q_len >= 0, f"query_start_loc must be non-decreasing (request {b})")
        if q_len == 0:
            continue
        _require(q_len <= q_max, f"request {b} has q_len {q_len} > Q_MAX = {q_max} (tree_masks.size(1))")
        _require(seq_len >= q_len, f"request {b} has seq_len {seq_len} < q_len {q_len}")
        _require(0 <= tree < num_trees, f"req_tree_ids[{b}] = {tree} is not in [0, {num_trees})")


def tree_attention(
    out: torch.Tensor,  # [N, Hq, D] (output)
    q: torch.Tensor,  # [N, Hq, D], unit stride on D
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D] strided view (CUDA: unit stride on D)
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D] strided view (CUDA: unit stride on D)
    block_table: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32, keys per request incl. its query tokens
    query_start_loc: torch.Tensor,  # [B + 1] int32
    tree_masks: torch.Tensor,  # [num_trees, Q_MAX, ceil(Q_MAX / 64)] int64 (pack_tree_masks)
    req_tree_ids: torch.Tensor,  # [B] int32
    scale: float,
    softcap: float = 0.0,
    num_splits: int = 0,
    *,
    validate: bool = False,
    check: bool = True,
) -> torch.Tensor:
    """Tree-masked paged attention; writes and returns `out`. `validate=True` adds host-syncing
    checks of the metadata values (debugging; never inside CUDA-graph capture). `check=False`
    skips the metadata checks (shapes, dtypes, devices) for callers that made them once already
    (the vLLM plugin, per layer per step, where they cost ~30 us of host time each)."""
    if check:
        _check_tree_attention(out, q, k_cache, v_cache, block_table, seq_lens, query_start_loc,
                              tree_masks, req_tree_ids)
    if validate:
        validate_tree_metadata(seq_lens, query_start_loc, tree_masks, req_tree_ids)
    if not have_extension():
        _warn_fallback_once()
    torch.ops.medusa_vllm.tree_attention(out, q, k_cache, v_cache, block_table, seq_lens, query_start_loc,
                                         tree_masks, req_tree_ids, float(scale), float(softcap), int(num_splits))
    return out


def move_accepted_kv(
    k_caches: Sequence[torch.Tensor],  # L x [num_blocks, block_size, Hkv, D] (mutated)
    v_caches: Sequence[torch.Tensor],  # L x [num_blocks, block_size, Hkv, D] (mutated)
    slot_mapping: torch.Tensor,  # [N] int64
    query_start_loc: torch.Tensor,  # [B + 1] int32
    accepted: torch.Tensor,  # [B, A] int32 window indices, strictly increasing, -1 terminated
    *,
    check: bool = True,
) -> None:
    """Copies, per request and in ascending k, window entry accepted[b, k] to entry k + 1.
    `check=False` skips the metadata checks (see :func:`tree_attention`)."""
    k_caches, v_caches = list(k_caches), list(v_caches)
    if check:
        _check_move_accepted_kv(k_caches, v_caches, slot_mapping, query_start_loc, accepted)
    if not have_extension():
        _warn_fallback_once()
    torch.ops.medusa_vllm.move_accepted_kv(k_caches, v_caches, slot_mapping, query_start_loc, accepted)


def _check_move_accepted_kv(k_caches, v_caches, slot_mapping, query_start_loc, accepted) -> None:
    _require(len(k_caches) > 0 and len(k_caches) == len(v_caches),
             f"k_caches and v_caches must be non-empty lists of equal length, got {len(k_caches)} and {len(v_caches)}")
    first = k_caches[0]
    for name, caches in (("k_caches", k_caches), ("v_caches", v_caches)):
        for i, t in enumerate(caches):
            _check_kv_view(t, f"{name}[{i}]")
            _require(t.shape == first.shape and t.dtype == first.dtype and t.device == first.device,
                     f"{name}[{i}] must match k_caches[0] ({tuple(first.shape)}, {first.dtype}, {first.device})")
            _require(t.stride() == caches[0].stride(), f"{name}[{i}] must have the strides of {name}[0]")
    _check_index(slot_mapping, "slot_mapping", torch.int64, 1, first.device)
    _check_index(query_start_loc, "query_start_loc", torch.int32, 1, first.device)
    _check_index(accepted, "accepted", torch.int32, 2, first.device)
    _require(query_start_loc.shape[0] == accepted.shape[0] + 1,
             f"query_start_loc must have {accepted.shape[0] + 1} entries (accepted is [B, A])")


def keyed_uniforms(keys: torch.Tensor, n: int) -> torch.Tensor:
    """[B, 2] int64 (seed, counter) -> [B, n] float32 uniforms in [0, 1) (multiples of 2**-24):
    a counter-based hash, a pure function of each row's key (any int64 seed, counter >= 0), the
    same on every device and at any batch row (csrc/keyed_uniforms.h; the reference
    :func:`keyed_uniforms_ref` gives the same numbers). A request that keys step t by its
    computed-token count draws fresh numbers every step and the same ones when the step is run
    again. One kernel, no host sync: a CUDA graph computes it in place."""
    _require(keys.dim() == 2 and keys.shape[1] == 2, f"keys must be [B, 2] (seed, counter), got shape {tuple(keys.shape)}")
    _require(keys.dtype == torch.int64, f"keys must be int64, got {keys.dtype}")
    _require(n >= 0, f"n must be >= 0, got {n}")
    if not _KEYED_OP:
        return keyed_uniforms_ref(keys, n)
    return torch.ops.medusa_vllm.keyed_uniforms(keys.contiguous(), int(n))


def target_probs(
    logits: torch.Tensor,  # [M, V] float32 / bfloat16 / float16, contiguous over V
    temperature: torch.Tensor,  # [M] float32, > 0
    top_k: torch.Tensor | None = None,  # [M] int32, <= 0 or >= V: off
    top_p: torch.Tensor | None = None,  # [M] float32, >= 1: off
    min_p: torch.Tensor | None = None,  # [M] float32, <= 0: off
) -> torch.Tensor:  # [M, V] float32
    """The distribution a sampled request draws from: logits / temperature, then min-p, top-k
    and top-p (vLLM's sampler's order; of equal logits at a boundary the lower token ids stay,
    the rule of vLLM's Triton top-k/top-p kernel: top-k keeps exactly k), renormalised
    (csrc/target_probs.h). No sort: each threshold is a 4-pass radix select, a row per block
    on a GPU; no host sync, so a CUDA graph can hold it. The reference
    :func:`target_probs_ref` sorts (stably)."""
    _require(logits.dim() == 2, f"logits must be [M, V], got shape {tuple(logits.shape)}")
    rows = logits.shape[0]
    for name, t, dtype in (("temperature", temperature, torch.float32), ("top_k", top_k, torch.int32),
                           ("top_p", top_p, torch.float32), ("min_p", min_p, torch.float32)):
        if t is not None:
            _require(t.shape == (rows,) and t.dtype == dtype,
                     f"{name} must be [{rows}] {dtype}, got {tuple(t.shape)} {t.dtype}")
    if not _TARGET_PROBS_OP:
        return target_probs_ref(logits, temperature, top_k, top_p, min_p)
    return torch.ops.medusa_vllm.target_probs(logits, temperature, top_k, top_p, min_p)


def rejection_walk(
    logits: torch.Tensor,  # [R, V] float32 / bfloat16 / float16, contiguous over V
    row_of_node: torch.Tensor,  # [B, Q] int64 logits row of each node (slot 0: root), -1: none
    children: torch.Tensor,  # [B, Q, C] int64 children of each node in rank order, -1: none
    drafts: torch.Tensor,  # [B, Q-1] int64 token of node i at i - 1
    valid: torch.Tensor,  # [B, Q] bool: node verified this step
    temperature: torch.Tensor,  # [B] float32, <= 1e-5: greedy (the point mass at the argmax)
    top_k: torch.Tensor | None,  # [B] int32, <= 0 or >= V: off (None: no request filters)
    top_p: torch.Tensor | None,  # [B] float32, >= 1: off
    min_p: torch.Tensor | None,  # [B] float32, <= 0: off
    accept_u: torch.Tensor,  # [B, L, C] float32 uniforms in [0, 1) of each level's children
    final_u: torch.Tensor,  # [B] float32 uniform in [0, 1) of the final draw
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # accepted [B, L-1] int64 (-1 pad), last_node [B], final [B]
    """The lossless rejection walk of a sampled tree step, one op (csrc/rejection_walk.h): from
    the root, each level's target at the current node's row (softmax(x / T) after min-p, top-k
    and top-p as :func:`target_probs` filters; a greedy request: the point mass at its argmax),
    the first offered child
    accepted with probability p / (1 - the earlier offered children's p), and at the stopping
    node the final token drawn from its target without its offered children's tokens (fixed-
    point masses: the same token on every device). A request per 1024-thread block on a GPU, no
    [B, V] tensor written, no host sync. The reference :func:`rejection_walk_ref` is the same
    walk in tensor ops."""
    _require(logits.dim() == 2 and row_of_node.dim() == 2 and children.dim() == 3,
             f"logits must be [R, V], row_of_node [B, Q], children [B, Q, C]; got {tuple(logits.shape)}, "
             f"{tuple(row_of_node.shape)}, {tuple(children.shape)}")
    b, q = row_of_node.shape
    width = children.shape[2]
    _require(1 <= width <= MAX_WALK_CHILDREN, f"children per node must be 1..{MAX_WALK_CHILDREN}, got {width}")
    for name, t, shape, dtype in (
            ("children", children, (b, q, width), torch.int64), ("drafts", drafts, (b, q - 1), torch.int64),
            ("valid", valid, (b, q), torch.bool), ("temperature", temperature, (b,), torch.float32),
            ("final_u", final_u, (b,), torch.float32), ("row_of_node", row_of_node, (b, q), torch.int64),
            ("top_k", top_k, (b,), torch.int32), ("top_p", top_p, (b,), torch.float32),
            ("min_p", min_p, (b,), torch.float32)):
        _require(t is None and name in ("top_k", "top_p", "min_p")
                 or t is not None and tuple(t.shape) == shape and t.dtype == dtype,
                 f"{name} must be {list(shape)} {dtype}, got {None if t is None else (tuple(t.shape), t.dtype)}")
    _require(accept_u.dim() == 3 and accept_u.shape[0] == b and accept_u.shape[2] == width
             and accept_u.shape[1] >= 1 and accept_u.dtype == torch.float32,
             f"accept_u must be [{b}, L, {width}] float32, got {tuple(accept_u.shape)} {accept_u.dtype}")
    if not _WALK_OP:
        return rejection_walk_ref(logits, row_of_node, children, drafts, valid, temperature, top_k, top_p, min_p,
                                  accept_u, final_u)
    return torch.ops.medusa_vllm.rejection_walk(logits, row_of_node, children, drafts, valid, temperature,
                                                top_k, top_p, min_p, accept_u, final_u)
