"""xformers' tree attention (``xformers.ops.tree_attention``, 0.0.35) behind the call of our
kernel: the optional backend ``"attention": "xformers"`` for users who already rely on xformers.

Per group of requests with the same query length and tree: the context part runs xformers' Triton
split-K op straight over vLLM's paged cache (``PagedBlockDiagonalPaddedKeysMask``, tiles of one
page), the tree part over the window's K/V (read back from the cache) with the tree as an explicit
bias; xformers merges them by log-sum-exp. The groups and the masks are made on the host from the
step's metadata, so this backend syncs the host in every layer: eager mode only. On the H100 it is
6.4x slower than our kernel (``benchmarks/results/tree_attention_h100_quick.json``).

xformers 0.0.35's wheel is built for torch 2.10: on torch 2.11 its C++ library does not load and
every op then refuses CUDA inputs ("xFormers wasn't build with CUDA support"), though the Triton
split-K op needs nothing from that library; :func:`load` lifts that gate flag (and says so).
"""

from __future__ import annotations

import math

import torch

from medusa_vllm.kernels.masks import unpack_tree_masks
from medusa_vllm.kernels.reference import gather_paged, tree_attention_ref

_state: dict = {}


class XformersUnavailable(RuntimeError):
    """xformers' tree attention cannot run here; the message says why and what to do."""


def load() -> dict:
    """Imports xformers' tree attention once; returns what ran it (version, gate lifted)."""
    if "info" in _state:
        return _state["info"]
    try:
        import xformers
        import xformers.ops.fmha.common as common
        import xformers.ops.tree_attention  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means: not available
        raise XformersUnavailable(
            f"medusa_vllm: attention 'xformers' needs xformers 0.0.35 (pip install --no-deps "
            f"xformers==0.0.35); importing it failed: {type(exc).__name__}: {exc}") from exc
    info = {"version": xformers.__version__}
    if not common._built_with_cuda:
        common._built_with_cuda = True  # only a gate: the Triton op needs no C++ library
        info["gate_lifted"] = "xformers.ops.fmha.common._built_with_cuda (C++ library not loaded)"
    _state["info"] = info
    return info


def _splitk(block_n: int):
    """The Triton split-K op with key tiles of ``block_n`` (its paged path needs the page size to
    be a multiple of the tile: 64 by default, vLLM's pages hold 16 tokens)."""
    from xformers.ops.fmha import triton_splitk

    key = ("op", block_n)
    if key not in _state:
        base = triton_splitk.FwOp
        _state[key] = base if block_n % base.BLOCK_N == 0 else type(
            f"FwOp_bn{block_n}", (base,), {"BLOCK_N": block_n, "NAME": f"{base.NAME}_bn{block_n}"})
    return _state[key]


def _tree_bias(tree_masks: torch.Tensor, tree_id: int, q_len: int, dtype, device) -> torch.Tensor:
    """[q_len, q_len] additive bias of one tree: 0 where the tree lets node i see node j."""
    key = ("bias", tree_masks.data_ptr(), tree_id, q_len, dtype)
    if key not in _state:
        allowed = unpack_tree_masks(tree_masks[tree_id : tree_id + 1, :q_len])[0, :, :q_len]
        _state[key] = torch.zeros(q_len, q_len, dtype=dtype, device=device).masked_fill(
            ~allowed.to(device), float("-inf"))
    return _state[key]


def tree_attention_xformers(
    out: torch.Tensor,  # [N, Hq, D] (output)
    q: torch.Tensor,  # [N, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D] (strided view)
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D] (strided view)
    block_table: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32
    query_start_loc: torch.Tensor,  # [B + 1] int32
    tree_masks: torch.Tensor,  # [num_trees, Q_MAX, W] int64
    req_tree_ids: torch.Tensor,  # [B] int32
    scale: float,
    softcap: float = 0.0,
    num_splits: int = 0,
) -> None:
    """Same contract as :func:`medusa_vllm.kernels.tree_attention` (host syncs: eager only)."""
    del num_splits
    import xformers.ops.tree_attention as xt
    from xformers.ops.fmha.attn_bias import PagedBlockDiagonalPaddedKeysMask

    load()
    nb, bs, hkv, d = k_cache.shape
    hq = q.shape[1]
    g = hq // hkv
    if softcap:
        raise ValueError("medusa_vllm: attention 'xformers' has no logit soft-capping; this "
                         "model needs it: use attention 'auto'")
    if not math.isclose(scale, d ** -0.5, rel_tol=1e-6):
        raise ValueError(f"medusa_vllm: attention 'xformers' scales by head_dim^-0.5 = {d ** -0.5:.6g}; "
                         f"this model uses {scale:.6g}: use attention 'auto'")
    qsl, lens, trees = query_start_loc.tolist(), seq_lens.tolist(), req_tree_ids.tolist()
    groups: dict[tuple[int, int], list[int]] = {}
    for r in range(len(lens)):
        q_len = qsl[r + 1] - qsl[r]
        if q_len:
            groups.setdefault((q_len, trees[r]), []).append(r)

    def grouped(t):  # [..., M, Hkv, D] -> [..., M, Hkv, G, D] (G expanded, no copy)
        return t.unsqueeze(-2).expand(*t.shape[:-1], g, d)

    k_ctx = grouped(k_cache.reshape(1, nb * bs, hkv, d))
    v_ctx = grouped(v_cache.reshape(1, nb * bs, hkv, d))
    for (q_len, tree_id), reqs in groups.items():
        ctx = [lens[r] - q_len for r in reqs]
        rows = torch.cat([torch.arange(qsl[r], qsl[r] + q_len) for r in reqs]).to(q.device)
        if min(ctx) <= 0:  # no context to page through: the reference handles it
            for r in reqs:
                sl = slice(qsl[r], qsl[r] + q_len)
                tree_attention_ref(out[sl], q[sl], k_cache, v_cache, block_table[r : r + 1],
                                   seq_lens[r : r + 1], query_start_loc.new_tensor([0, q_len]),
                                   tree_masks, req_tree_ids[r : r + 1], scale)
            continue
        b = len(reqs)
        q5 = q[rows].view(b, q_len, hkv, g, d)
        window = [(gather_paged(k_cache, block_table[r], lens[r])[-q_len:],
                   gather_paged(v_cache, block_table[r], lens[r])[-q_len:]) for r in reqs]
        k_tree = grouped(torch.stack([k for k, _ in window]))  # [b, q_len, Hkv, G, D]
        v_tree = grouped(torch.stack([v for _, v in window]))
        blocks = block_table[reqs, : -(-max(ctx) // bs)].contiguous()
        prefix = PagedBlockDiagonalPaddedKeysMask.from_seqlens(
            q_seqlen=[q_len] * b, kv_seqlen=ctx, block_tables=blocks, page_size=bs, device=q.device)
        o = xt.tree_attention(q5, k_tree, v_tree, k_ctx, v_ctx,
                              _tree_bias(tree_masks, tree_id, q_len, q.dtype, q.device), prefix,
                              prefix_op=_splitk(bs), suffix_op=_splitk(16))
        out[rows] = o.reshape(b * q_len, hq, d).to(out.dtype)
