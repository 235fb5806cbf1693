"""Tree attention inside vLLM: backends that send tree-decode requests to our kernel and every
other request (prefill chunks) to vLLM's own backend for the platform.

The runner sorts short queries (decodes) to the front of the batch (``reorder_batch_threshold`` =
1 + max tree nodes), writes each request's mask (0 = causal chain, k + 1 = tree k) into a
persistent device buffer and, before vLLM builds the attention metadata of a step, hands the
builders a :class:`TreeAttnStep`: how many leading requests/tokens go to our kernel. The builder
keeps vLLM's metadata for the rest of the batch; the impl runs
``medusa_vllm.kernels.tree_attention`` on the leading tokens and vLLM's kernel on the others.

CUDA graphs: when every request of a step is a decode (``all_reqs``), the kernel takes the whole
— padded — batch and reads only persistent buffers (vLLM's query_start_loc, seq_lens, block
table; our mask ids), so vLLM captures it in its FULL graphs of uniform batches (1 + max tree
nodes tokens per request; the runner marks its uniform-decode dummy runs ``all_reqs`` for the
capture) and replays them with each step's values; a prefill chunk of exactly that length in
such a batch gets mask 0, plain causal attention.
KV writes stay vLLM's (``do_kv_cache_update``, linear slots). The platform backends are
in :mod:`.attention_cpu` and :mod:`.attention_gpu` (TRITON_ATTN or FLASH_ATTN underneath, made by
one factory; each imported only on its platform).

Cache layouts (the kernel takes [num_blocks, block_size, kv_heads, head_dim] strided views):
- CPU_ATTN: [nb, H, bs, 2D] viewed as [nb, H, 2bs, D]: K rows [0, bs), V rows [bs, 2bs);
- TRITON_ATTN and FLASH_ATTN (NHD): logical [nb, H, bs, 2D], physical [nb, bs, H, 2D]: K = [..., :D],
  V = [..., D:].
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.worker.ubatch_utils import UBatchSlice, _make_metadata_with_slice

from medusa_vllm import kernels


@dataclass
class TreeAttnStep:
    num_reqs: int  # leading requests of the batch that go to the tree kernel
    num_tokens: int  # their query tokens
    all_reqs: bool = False  # every request (incl. CUDA-graph padding) goes to the tree kernel
    # a capture marked as a whole (V2): only batches of 2..Q tokens per request are tree steps
    uniform_only: bool = False

    @classmethod
    def for_capture(cls, uniform_only: bool = False) -> TreeAttnStep:
        """The step of vLLM's uniform-decode dummy runs, from which it captures FULL graphs:
        the whole (dummy) batch in the tree kernel. ``uniform_only``: the mark covers a whole
        capture (vLLM's V2 runner), whose batches of other shapes keep vLLM's attention."""
        return cls(0, 0, all_reqs=True, uniform_only=uniform_only)


def tree_capture_shape(cm: CommonAttentionMetadata, q: int) -> bool:
    """A capture batch of a tree step's shape: uniform, 2..q tokens per request. Where a mark
    covers a whole capture (vLLM's V2 runner), a FULL graph of any other shape, plain
    decoding's one token per request included, keeps vLLM's kernel: such a step is vLLM's own."""
    return 1 < cm.max_query_len <= q and cm.num_actual_tokens == cm.num_reqs * cm.max_query_len


class MedusaAttnContext:
    """Shared by the runner (writes ``step`` and ``mask_ids``) and every builder (reads them)."""

    def __init__(self, masks: torch.Tensor, max_num_reqs: int, backend: str = "kernel") -> None:
        self.masks = masks  # [1 + NT, Q, W] int64 packed: 0 = causal chain, k + 1 = tree k
        self.backend = backend  # "kernel", "reference" (debugging) or "xformers" (eager only)
        # [max_num_reqs] int32, persistent (CUDA graphs read it): mask of each request, 0 beyond
        self.mask_ids = torch.zeros(max_num_reqs, dtype=torch.int32, device=masks.device)
        self.step: TreeAttnStep | None = None


@dataclass
class TreeAttnMetadata:
    num_tokens: int
    query_start_loc: torch.Tensor  # [R + 1] int32
    seq_lens: torch.Tensor  # [R] int32: context + query
    block_table: torch.Tensor  # [R, max_blocks] int32
    mask_ids: torch.Tensor  # [R] int32
    masks: torch.Tensor  # [1 + NT, Q, W] int64
    backend: str = "kernel"  # "reference" / "xformers": host syncs, eager mode only


@dataclass
class MedusaMetadata:
    """Tree part (leading requests) + vLLM's metadata for the remaining requests (or None)."""

    tree: TreeAttnMetadata
    rest: object | None
    num_actual_tokens: int
    slot_mapping: torch.Tensor


def _split_build(builder, parent_build, common_prefix_len: int, cm: CommonAttentionMetadata,
                 fast_build: bool):
    ctx: MedusaAttnContext | None = getattr(builder, "medusa", None)
    step = ctx.step if ctx is not None else None
    if step is None or (step.num_reqs == 0 and not step.all_reqs):
        return parent_build(common_prefix_len, cm, fast_build)
    if step.uniform_only and not tree_capture_shape(cm, ctx.masks.shape[1]):
        # a V2 capture of plain decoding (the load-adaptive tree's q = 1 graphs): vLLM's own
        return parent_build(common_prefix_len, cm, fast_build)
    if step.all_reqs:  # cm.num_reqs includes the padding of a CUDA-graph batch
        nd, ndt = cm.num_reqs, cm.num_actual_tokens
    else:
        nd, ndt = step.num_reqs, step.num_tokens
    tree = TreeAttnMetadata(
        num_tokens=ndt,
        query_start_loc=cm.query_start_loc[: nd + 1],
        seq_lens=cm.seq_lens[:nd],
        block_table=cm.block_table_tensor[:nd],
        mask_ids=ctx.mask_ids[:nd],
        masks=ctx.masks,
        backend=ctx.backend,
    )
    rest = None
    if nd < cm.num_reqs:
        sliced = _make_metadata_with_slice(
            UBatchSlice(slice(nd, cm.num_reqs), slice(ndt, cm.num_actual_tokens)), cm
        )
        rest = parent_build(0, _aligned(sliced), fast_build)
    return MedusaMetadata(tree, rest, cm.num_actual_tokens, cm.slot_mapping)


def _aligned(cm):
    """``cm`` with a fresh copy of each tensor that does not start on a 16-byte boundary.
    vLLM's slice of a step's metadata holds views of the batch's buffers from the first request
    past the tree decodes on (``seq_lens[nd:]`` starts 4 * nd bytes in), and Triton specializes
    its kernels' pointer arguments on 16-byte alignment: an unaligned view would make vLLM's
    Triton attention compile a variant that no plain step needs, a host stall of some hundred
    ms the first time in a process (a candidate for the 412 ms stall of a step with 7 tree
    decodes and a new request in ``benchmarks/results/step_log_h100_fa59925.json``). A few
    small copies, in steps that mix tree decodes with other requests only."""
    bad = {k: v for k, v in vars(cm).items() if isinstance(v, torch.Tensor) and v.data_ptr() % 16}
    if not bad:
        return cm
    out = copy.copy(cm)
    for k, v in bad.items():
        setattr(out, k, v.clone())
    return out


class TreeImplMixin:
    """``forward`` of the platform impls: tree decodes (a :class:`MedusaMetadata`) split between
    our kernel and the parent impl; any other step goes to the parent unchanged. The backend
    sets ``kv_views`` (its cache layout, see the module docstring)."""

    kv_views = None  # staticmethod(kv_cache) -> (k_cache, v_cache)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        if not isinstance(attn_metadata, MedusaMetadata):
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   *args, **kwargs)
        k_cache, v_cache = self.kv_views(kv_cache)
        return _split_forward(self, super().forward, layer, query, key, value, kv_cache,
                              attn_metadata, output, k_cache, v_cache)


def _split_forward(impl, parent_forward, layer, query, key, value, kv_cache, md: MedusaMetadata,
                   output, k_cache, v_cache):
    t = md.tree
    # all requests in the kernel: the whole (maybe padded) query; rows past the last request's
    # are padding, which the kernel leaves alone
    n = t.num_tokens if md.rest is not None else query.shape[0]
    # the metadata checks run on each layer's first tree step only (host time on every later one)
    checked = getattr(impl, "_medusa_checked", False)
    args = (output[:n], query[:n], k_cache, v_cache, t.block_table, t.seq_lens, t.query_start_loc,
            t.masks, t.mask_ids, impl.scale, float(impl.logits_soft_cap or 0.0), 0)
    if t.backend == "reference":
        kernels.tree_attention_ref(*args)
    elif t.backend == "xformers":
        from medusa_vllm.kernels.xformers_tree import tree_attention_xformers

        tree_attention_xformers(*args)
    else:
        kernels.tree_attention(*args, check=not checked)
    impl._medusa_checked = True
    if md.rest is not None:
        parent_forward(
            layer,
            query[n:],
            key[n:] if key is not None else None,
            value[n:] if value is not None else None,
            kv_cache,
            md.rest,
            output=output[n:],
        )
    return output
