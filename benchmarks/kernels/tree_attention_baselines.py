"""The contenders of benchmarks/kernels/tree_attention.py. Each takes a Problem and returns
(fn, out [N, Hq, D], info): fn() runs one attention call, out is its result (for the accuracy
check against ours), info says what ran. Optional libraries raise ImportError when missing."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from medusa_vllm.kernels import testing as kt


@dataclass
class Problem:
    """B identical-shape requests: `ctx` cached tokens + a tree window of q_len tokens."""

    p: kt.TreeAttentionProblem
    tree: torch.Tensor  # [q_len, q_len] bool (cuda)

    @property
    def batch(self) -> int:
        return self.p.seq_lens.shape[0]

    @property
    def q_len(self) -> int:
        return self.tree.shape[0]

    @functools.cached_property
    def seq_len(self) -> int:
        return int(self.p.seq_lens[0])

    @property
    def ctx(self) -> int:
        return self.seq_len - self.q_len

    def kv_bytes(self) -> int:
        k = self.p.cache.k
        return self.batch * self.seq_len * k.shape[2] * k.shape[3] * 2 * k.element_size()

    @functools.cached_property
    def gathered_bl(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of every request, contiguous [B, L, Hkv, D]."""
        bs = self.p.cache.k.shape[1]
        pos = torch.arange(self.seq_len, device=self.p.q.device)
        blocks = self.p.block_table[:, pos // bs].long()  # [B, L]
        return self.p.cache.k[blocks, pos % bs].contiguous(), self.p.cache.v[blocks, pos % bs].contiguous()

    @functools.cached_property
    def gathered_hl(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V as [B, Hkv, L, D] (FlexAttention / SDPA layout)."""
        return tuple(t.transpose(1, 2).contiguous() for t in self.gathered_bl)

    def q4(self) -> torch.Tensor:  # [B, Hq, q_len, D]
        n, hq, d = self.p.q.shape
        return self.p.q.view(self.batch, self.q_len, hq, d).transpose(1, 2).contiguous()

    def from_q4(self, o: torch.Tensor) -> torch.Tensor:  # [B, Hq, q_len, D] -> [N, Hq, D]
        return o.transpose(1, 2).reshape(self.p.q.shape)

    def dense_mask(self) -> torch.Tensor:  # [q_len, L] bool
        mask = torch.ones(self.q_len, self.seq_len, dtype=torch.bool, device=self.tree.device)
        mask[:, self.ctx :] = self.tree
        return mask


def ours(problem: Problem):
    p = problem.p
    out = torch.empty_like(p.q)
    args = (out, p.q, p.cache.k, p.cache.v, p.block_table, p.seq_lens, p.query_start_loc, p.tree_masks,
            p.req_tree_ids, p.scale, 0.0, 0)
    fn = functools.partial(torch.ops.medusa_vllm.tree_attention, *args)  # the op, without the wrapper's checks
    fn()
    return fn, out


MAX_FLEX_TREE = 128  # query window rows / keys the persistent flex mask covers


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


@functools.cache
def _flex_mask(device: torch.device):
    """One mask_mod for every point: it reads the tree and the context length from device
    tensors refreshed per point, so the compiled flex_attention is not re-traced for each new
    closure (dynamo guards on the mask_mod function)."""
    tree = torch.zeros(MAX_FLEX_TREE, MAX_FLEX_TREE, dtype=torch.bool, device=device)
    ctx = torch.zeros((), dtype=torch.int64, device=device)
    last = MAX_FLEX_TREE - 1

    def mask_mod(b, h, q_idx, kv_idx):  # context fully visible, tree bits on the window
        return (kv_idx < ctx) | tree[q_idx.clamp(max=last), (kv_idx - ctx).clamp(0, last)]

    return tree, ctx, mask_mod


def flex(problem: Problem):
    from torch.nn.attention.flex_attention import create_block_mask

    tree, ctx, mask_mod = _flex_mask(problem.p.q.device)
    tree.zero_()
    tree[: problem.q_len, : problem.q_len] = problem.tree
    ctx.fill_(problem.ctx)
    block_mask = create_block_mask(mask_mod, None, None, problem.q_len, problem.seq_len, device=problem.p.q.device)
    q4, (k, v) = problem.q4(), problem.gathered_hl
    fn = functools.partial(_compiled_flex(), q4, k, v, block_mask=block_mask, scale=problem.p.scale, enable_gqa=True)
    return fn, problem.from_q4(fn()), {"block_size": list(block_mask.BLOCK_SIZE)}


def sdpa(problem: Problem):
    q4, (k, v) = problem.q4(), problem.gathered_hl
    mask = problem.dense_mask()[None, None]
    fn = functools.partial(F.scaled_dot_product_attention, q4, k, v, attn_mask=mask, scale=problem.p.scale,
                           enable_gqa=True)
    return fn, problem.from_q4(fn()), None


def flashinfer(problem: Problem):
    import flashinfer as fi

    p, b, q_len, seq_len = problem.p, problem.batch, problem.q_len, problem.seq_len
    bs = p.cache.k.shape[1]
    pages = -(-seq_len // bs)
    dev = p.q.device
    wrapper = fi.BatchPrefillWithPagedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device=dev), "NHD")
    wrapper.plan(
        torch.arange(b + 1, dtype=torch.int32, device=dev) * q_len,  # qo_indptr
        torch.arange(b + 1, dtype=torch.int32, device=dev) * pages,  # paged_kv_indptr
        p.block_table[:, :pages].reshape(-1).contiguous(),  # paged_kv_indices
        torch.full((b,), (seq_len - 1) % bs + 1, dtype=torch.int32, device=dev),  # last page lengths
        p.q.shape[1], p.cache.k.shape[2], p.q.shape[2], bs,
        custom_mask=problem.dense_mask().repeat(b, 1).reshape(-1),
        sm_scale=p.scale, q_data_type=p.q.dtype, kv_data_type=p.q.dtype,
    )
    kv = (p.cache.k.contiguous(), p.cache.v.contiguous())  # own contiguous pages
    fn = functools.partial(wrapper.run, p.q, kv)
    return fn, fn(), {"version": fi.__version__}


def _xformers_splitk(block_n: int):
    """xformers' Triton split-K op with key tiles of `block_n` (its paged path needs the page
    size to be a multiple of the tile: 64 by default, vLLM's pages hold 16 tokens)."""
    from xformers.ops.fmha import triton_splitk

    if triton_splitk.FwOp.BLOCK_N <= block_n and block_n % triton_splitk.FwOp.BLOCK_N == 0:
        return triton_splitk.FwOp
    return type(f"FwOp_bn{block_n}", (triton_splitk.FwOp,),
                {"BLOCK_N": block_n, "NAME": f"{triton_splitk.FwOp.NAME}_bn{block_n}"})


def xformers(problem: Problem):
    """xformers.ops.tree_attention: prefix (context) attention read straight from the same paged
    cache (PagedBlockDiagonalPaddedKeysMask, Triton split-K with tiles of one page), tree part
    on the window's K/V with the tree as an explicit bias, merged by log-sum-exp. If the paged
    prefix cannot run, the context is gathered (BlockDiagonalPaddedKeysMask) and info says why.
    xformers' own dispatch picks CUDA/FA3 ops, which its torch-2.10 wheel cannot load on torch
    2.11; the Triton split-K op is pure Triton and is passed explicitly."""
    import xformers as xf
    import xformers.ops.fmha.common as xf_common
    import xformers.ops.tree_attention as xt
    from xformers.ops.fmha.attn_bias import BlockDiagonalPaddedKeysMask, PagedBlockDiagonalPaddedKeysMask

    info = {"version": xf.__version__}
    if not xf_common._built_with_cuda:
        # Every op's support check refuses CUDA inputs when xformers' C++ library did not load
        # (no build metadata), even the pure-Triton split-K op: H100 run of 2026-11-23,
        # "`triton_splitKF` is not supported because: xFormers wasn't build with CUDA support".
        # The flag only gates; the Triton kernels need nothing from the C++ library.
        xf_common._built_with_cuda = True
        info["gate_bypassed"] = "xformers.ops.fmha.common._built_with_cuda (C++ library not loaded)"
    p, b, q_len, ctx = problem.p, problem.batch, problem.q_len, problem.ctx
    n, hq, d = p.q.shape
    nb, bs, hkv, _ = p.cache.k.shape
    g = hq // hkv
    q5 = p.q.view(b, q_len, hkv, g, d)  # BMGHK: G = kv heads, H = q heads per kv head

    def grouped(t):  # [..., M, Hkv, D] -> [..., M, Hkv, G, D] (G expanded, no copy)
        return t.unsqueeze(-2).expand(*t.shape[:-1], g, d)

    k_all, v_all = problem.gathered_bl  # [B, L, Hkv, D]: the window's K/V (fresh keys in a real step)
    k_tree, v_tree = grouped(k_all[:, ctx:].contiguous()), grouped(v_all[:, ctx:].contiguous())
    spec_bias = torch.zeros(q_len, q_len, dtype=p.q.dtype, device=p.q.device).masked_fill(~problem.tree, float("-inf"))
    suffix_op = _xformers_splitk(16)
    info["suffix_op"] = suffix_op.NAME
    try:
        prefix_op = _xformers_splitk(bs)
        block_table = p.block_table[:, : -(-ctx // bs)].contiguous()
        bias = PagedBlockDiagonalPaddedKeysMask.from_seqlens(
            q_seqlen=[q_len] * b, kv_seqlen=[ctx] * b, block_tables=block_table, page_size=bs, device=p.q.device)
        k_ctx, v_ctx = (grouped(t.reshape(1, nb * bs, hkv, d)) for t in (p.cache.k, p.cache.v))
        fn = functools.partial(xt.tree_attention, q5, k_tree, v_tree, k_ctx, v_ctx, spec_bias, bias,
                               prefix_op=prefix_op, suffix_op=suffix_op)
        out = fn()
        info |= {"prefix_op": prefix_op.NAME, "prefix_kv": f"paged, {bs}-token pages (the same cache)"}
    except Exception as exc:  # noqa: BLE001 - recorded; the gathered prefix below still runs
        info["paged_prefix_error"] = f"{type(exc).__name__}: {str(exc)[:1500]}"
        prefix_op = _xformers_splitk(64)
        k_ctx, v_ctx = (grouped(t[:, :ctx].contiguous()) for t in (k_all, v_all))
        bias = BlockDiagonalPaddedKeysMask.from_seqlens(q_seqlen=[q_len] * b, kv_padding=ctx, kv_seqlen=[ctx] * b,
                                                        device=p.q.device)
        fn = functools.partial(xt.tree_attention, q5, k_tree, v_tree, k_ctx, v_ctx, spec_bias, bias,
                               prefix_op=prefix_op, suffix_op=suffix_op)
        try:
            out = fn()
        except Exception as exc2:  # the row's error then names both failures
            raise RuntimeError(f"gathered prefix: {type(exc2).__name__}: {exc2}; "
                               f"paged prefix before it: {info['paged_prefix_error']}") from exc2
        info |= {"prefix_op": prefix_op.NAME, "prefix_kv": "gathered, contiguous (not timed)"}
    return fn, out.reshape(n, hq, d), info


def software_versions() -> dict:
    import medusa_vllm

    versions = {"torch": torch.__version__, "medusa_vllm": medusa_vllm.__version__}
    for name in ("triton", "flashinfer", "xformers"):
        try:
            versions[name] = __import__(name).__version__
        except Exception as exc:  # noqa: BLE001 - record why an optional library is absent
            versions[name] = None
            versions[f"{name}_import_error"] = f"{type(exc).__name__}: {exc}"
    return versions
