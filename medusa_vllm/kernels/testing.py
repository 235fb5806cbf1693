"""Builders of kernel test / benchmark inputs: paged KV caches in vLLM's two layouts with
shuffled block tables, tree masks (chain, star, Medusa's mc_sim_7b_63, random) and whole
tree_attention / move_accepted_kv problems. Used by tests/kernels and benchmarks/kernels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from medusa_vllm.kernels.masks import pack_tree_masks

# "nhd": vLLM's GPU layout; "cpu_vec": vLLM 0.26 CPU_ATTN ("vec"/"vec16": K^T blocks, head_dim
# stride = block_size; CPU only); "cpu_rows": [nb, Hkv, 2bs, D] with K rows [0, bs), V rows [bs, 2bs).
LAYOUTS = ("nhd", "cpu_vec", "cpu_rows")
UNIT_STRIDE_LAYOUTS = ("nhd", "cpu_rows")  # what the CUDA kernels accept

# FasterDecoding/Medusa medusa_choices.py, verbatim (63 nodes; the root is implicit).
MC_SIM_7B_63: list[list[int]] = [
    [0], [0, 0], [1], [0, 1], [2], [0, 0, 0], [1, 0], [0, 2], [3], [0, 3], [4], [0, 4], [2, 0],
    [0, 5], [0, 0, 1], [5], [0, 6], [6], [0, 7], [0, 1, 0], [1, 1], [7], [0, 8], [0, 0, 2], [3, 0],
    [0, 9], [8], [9], [1, 0, 0], [0, 2, 0], [1, 2], [0, 0, 3], [4, 0], [2, 1], [0, 0, 4], [0, 0, 5],
    [0, 0, 0, 0], [0, 1, 1], [0, 0, 6], [0, 3, 0], [5, 0], [1, 3], [0, 0, 7], [0, 0, 8], [0, 0, 9],
    [6, 0], [0, 4, 0], [1, 4], [7, 0], [0, 1, 2], [2, 0, 0], [3, 1], [2, 2], [8, 0], [0, 5, 0],
    [1, 5], [1, 0, 1], [0, 2, 1], [9, 0], [0, 6, 0], [0, 0, 0, 1], [1, 6], [0, 7, 0],
]  # fmt: skip


def mask_from_parents(parents: Sequence[int]) -> torch.Tensor:
    """[Q, Q] bool ancestor mask (self included) of a tree given by parent indices
    (parents[0] = -1 for the root, parents[i] < i otherwise)."""
    q = len(parents)
    mask = torch.zeros(q, q, dtype=torch.bool)
    for i, parent in enumerate(parents):
        mask[i, i] = True
        if parent >= 0:
            mask[i] |= mask[parent]
    return mask


def parents_from_paths(paths: Sequence[Sequence[int]]) -> list[int]:
    """Medusa choices (paths of child ranks, root implicit) -> parents of root + nodes, in
    the (len, path) order Medusa uses."""
    ordered = sorted((tuple(p) for p in paths), key=lambda p: (len(p), p))
    index = {(): 0} | {p: i + 1 for i, p in enumerate(ordered)}
    return [-1] + [index[p[:-1]] for p in ordered]


def chain_mask(q: int) -> torch.Tensor:
    return torch.ones(q, q, dtype=torch.bool).tril()


def star_mask(q: int) -> torch.Tensor:
    return mask_from_parents([-1] + [0] * (q - 1))


def medusa_mask(num_nodes: int = 63) -> torch.Tensor:
    """Ancestor mask of root + the first num_nodes nodes of mc_sim_7b_63 (a BFS prefix)."""
    parents = parents_from_paths(MC_SIM_7B_63)
    return mask_from_parents(parents[: num_nodes + 1])


def random_tree_mask(q: int, gen: torch.Generator) -> torch.Tensor:
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, q)]
    return mask_from_parents(parents)


def pad_masks(masks: Sequence[torch.Tensor], q_max: int) -> torch.Tensor:
    """Stack [Qi, Qi] masks into [num_trees, q_max, q_max] (zero padded)."""
    out = torch.zeros(len(masks), q_max, q_max, dtype=torch.bool)
    for t, m in enumerate(masks):
        out[t, : m.shape[0], : m.shape[1]] = m
    return out


@dataclass
class PagedKVCache:
    storage: torch.Tensor  # the per-layer tensor vLLM allocates (layout dependent)
    k: torch.Tensor  # [num_blocks, block_size, Hkv, D] view
    v: torch.Tensor  # [num_blocks, block_size, Hkv, D] view


def make_kv_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                  device: torch.device | str, layout: str, gen: torch.Generator | None = None) -> PagedKVCache:
    """Random per-layer cache in one of LAYOUTS, with K/V as [nb, bs, Hkv, D] strided views.
    gen=None draws on the device from the global RNG (fast for GPU benchmarks)."""
    if layout == "nhd":
        shape = (num_blocks, block_size, num_kv_heads, 2 * head_dim)
    elif layout in ("cpu_vec", "cpu_rows"):
        shape = (num_blocks, num_kv_heads, block_size, 2 * head_dim)
    else:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if gen is None:
        storage = torch.randn(shape, device=device, dtype=dtype)
    else:
        storage = torch.randn(shape, generator=gen).to(dtype=dtype, device=device)
    if layout == "nhd":
        k, v = storage[..., :head_dim], storage[..., head_dim:]
    elif layout == "cpu_rows":
        rows = storage.view(num_blocks, num_kv_heads, 2 * block_size, head_dim)
        k = rows[:, :, :block_size].permute(0, 2, 1, 3)
        v = rows[:, :, block_size:].permute(0, 2, 1, 3)
    else:  # per (block, head): K^T [D, bs] then V [bs, D]
        flat = storage.view(num_blocks, num_kv_heads, 2 * block_size * head_dim)
        k = flat[:, :, : block_size * head_dim].view(num_blocks, num_kv_heads, head_dim, block_size).permute(0, 3, 1, 2)
        v = flat[:, :, block_size * head_dim :].view(num_blocks, num_kv_heads, block_size, head_dim).permute(0, 2, 1, 3)
    return PagedKVCache(storage, k, v)


def make_block_table(seq_lens: Sequence[int], block_size: int, num_blocks: int, gen: torch.Generator,
                     extra_cols: int = 1, fill: int = -1) -> torch.Tensor:
    """[B, max_blocks] int32 of distinct random physical blocks; unused entries = fill."""
    need = [(s + block_size - 1) // block_size for s in seq_lens]
    if sum(need) > num_blocks:
        raise ValueError(f"{sum(need)} blocks needed, cache has {num_blocks}")
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    table = torch.full((len(seq_lens), max(need, default=0) + extra_cols), fill, dtype=torch.int32)
    used = 0
    for b, n in enumerate(need):
        table[b, :n] = torch.tensor(perm[used : used + n], dtype=torch.int32)
        used += n
    return table


def slots_of(block_table: torch.Tensor, b: int, positions: Sequence[int], block_size: int) -> list[int]:
    return [int(block_table[b, p // block_size]) * block_size + p % block_size for p in positions]


@dataclass
class TreeAttentionProblem:
    out: torch.Tensor  # [N, Hq, D]
    q: torch.Tensor  # [N, Hq, D] (maybe a strided view)
    cache: PagedKVCache
    block_table: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32
    query_start_loc: torch.Tensor  # [B + 1] int32
    tree_masks: torch.Tensor  # [num_trees, Q_MAX, W] int64
    req_tree_ids: torch.Tensor  # [B] int32
    slot_mapping: torch.Tensor  # [N] int64
    scale: float

    def args(self) -> tuple:
        return (self.out, self.q, self.cache.k, self.cache.v, self.block_table, self.seq_lens,
                self.query_start_loc, self.tree_masks, self.req_tree_ids)


def make_tree_attention_problem(
    q_lens: Sequence[int], ctx_lens: Sequence[int], tree_ids: Sequence[int], masks: Sequence[torch.Tensor],
    *, num_q_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
    device: torch.device | str, layout: str = "nhd", q_max: int | None = None, strided_q: bool = False,
    spare_blocks: int = 3, seed: int = 0, cache_on_device_rng: bool = False,
) -> TreeAttentionProblem:
    """Requests with q_lens[b] query tokens after ctx_lens[b] context tokens, using tree
    tree_ids[b] of `masks` (its first q_len rows/columns). cache_on_device_rng draws the KV
    cache on the device (global RNG) instead of on the CPU (seeded, device independent)."""
    gen = torch.Generator().manual_seed(seed)
    q_max = q_max or max(m.shape[0] for m in masks)
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens)]
    num_blocks = sum((s + block_size - 1) // block_size for s in seq_lens) + spare_blocks
    cache = make_kv_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, device, layout,
                          None if cache_on_device_rng else gen)
    block_table = make_block_table(seq_lens, block_size, num_blocks, gen)
    qsl = [0]
    for q in q_lens:
        qsl.append(qsl[-1] + q)
    n = qsl[-1]
    width = num_q_heads * head_dim
    if strided_q:  # q as a slice of a fused qkv projection: row stride > Hq * D
        qkv = torch.randn(n, width + 2 * num_kv_heads * head_dim, generator=gen).to(dtype=dtype, device=device)
        q = qkv[:, :width].view(n, num_q_heads, head_dim)
    else:
        q = torch.randn(n, num_q_heads, head_dim, generator=gen).to(dtype=dtype, device=device)
    slots = []
    for b, (c, ql) in enumerate(zip(ctx_lens, q_lens)):
        slots += slots_of(block_table, b, range(c, c + ql), block_size)
    return TreeAttentionProblem(
        out=torch.full((n, num_q_heads, head_dim), float("nan"), dtype=dtype, device=device),
        q=q,
        cache=cache,
        block_table=block_table.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        tree_masks=pack_tree_masks(pad_masks(masks, q_max)).to(device),
        req_tree_ids=torch.tensor(tree_ids, dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        scale=head_dim**-0.5,
    )


def sampled_step_problem(vocab: int, device: str = "cuda", logits_dtype: torch.dtype = torch.float32,
                         filtered: bool = True):
    """A sampled tree step over 16 requests of a 6-node tree (temperature 0.8, top-k 50,
    top-p 0.95, or no filter; each row's likeliest token stands out and each node offers its
    parent's favourite, so drafts get accepted): returns ``step()``, the step's outputs as a tuple."""
    from medusa_vllm.graphed_step import sampled_tree_step
    from medusa_vllm.sampling import SamplingBatch, StepRandomness
    from medusa_vllm.tree import TokenTree
    from medusa_vllm.tree_tensors import TreeTensors

    tree = TokenTree.from_choices([(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)])
    trees = TreeTensors.build([tree], device)
    q, b, h = 7, 16, 8
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(b * q, vocab, device=device, generator=g) * 3
    top = logits.argmax(-1)
    logits[torch.arange(b * q, device=device), top] += 6
    logits = logits.to(logits_dtype)
    parent = torch.tensor([0, 0, 1, 1, 2, 3], device=device)  # the tree's nodes 1..6 (BFS)
    drafts = top.view(b, q)[:, parent].reshape(-1).int()
    hidden = torch.randn(b * q, h, device=device, generator=g)
    tree_ids = torch.zeros(b, dtype=torch.int64, device=device)
    k, p = (50.0, 0.95) if filtered else (0.0, 1.0)
    params = torch.tensor([0.8, k, p, 0.0], device=device).expand(b, 4).contiguous()
    s = SamplingBatch(params[:, 0], params[:, 1].long(), params[:, 2])
    rand = StepRandomness.draw(b, trees.max_depth + 1, trees.children.shape[2], s, device)
    w = torch.randn(h, vocab, device=device, generator=g)

    def step() -> tuple:
        out = sampled_tree_step(logits, drafts, hidden, tree_ids, params, rand.flat(), trees,
                                lambda hh: (hh @ w).topk(q - 1, dim=-1).indices, filtered=filtered)
        return out.as_tuple()

    return step


def eager_then_graphed(step) -> tuple[tuple, tuple]:
    """Runs ``step()`` eagerly under torch's sync check (a host sync raises), then captures it in
    a CUDA graph (warmed up on a side stream) and replays it: (eager outputs, replayed outputs)."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        eager = step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    return eager, captured


def walk_problem(batch: int, vocab: int, seed: int = 0, device: str = "cpu",
                 logits_dtype: torch.dtype = torch.float32, trees=("default-63", "sparse-15"),
                 distinct: bool = False, filters: bool = False) -> tuple:
    """rejection_walk's inputs for ``batch`` requests over a stack of trees (each request's tree
    and verified-node count random): (logits, row_of_node, children, drafts, valid, temperature,
    top_k, top_p, min_p, accept_u, final_u). Every fourth request is greedy, the others sample at
    temperatures 0.3 to 1.5; ``filters``: requests use top-k (1 to 200, or off), top-p (0.3 to
    0.99, or off) and min-p (0.05, 0.2, or off) in every mix (else None: no filter); each row's
    favourite stands out. A rank-0 node mostly holds its parent's favourite
    (paths of every length get accepted), a rank-1 node sometimes repeats its rank-0 sibling's
    token; the others hold random tokens. ``distinct``: rank r holds the parent's favourite + r
    (siblings never share a token, as Medusa's top-k drafts)."""
    from medusa_vllm.tree import get_tree
    from medusa_vllm.tree_tensors import TreeTensors

    stack = TreeTensors.build([get_tree(t, num_heads=4, topk=10) for t in trees], device)
    q, width, levels = stack.parents.shape[1], stack.children.shape[2], stack.max_depth + 1
    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, device=device, generator=g)

    tree_ids = torch.randint(0, len(trees), (batch,), device=device, generator=g)
    sizes = torch.tensor([get_tree(t, num_heads=4, topk=10).num_nodes for t in trees], device=device)[tree_ids]
    num_nodes = (rand(batch) * (sizes + 1).float()).long().clamp_max(sizes)
    logits = torch.randn(batch * q, vocab, device=device, generator=g) * 2
    top = logits.argmax(-1)
    logits[torch.arange(batch * q, device=device), top] += 4 * rand(batch * q)
    fav = top.view(batch, q).gather(1, stack.parents[tree_ids].clamp_min(0))[:, 1:]  # [B, Q-1]
    rank = stack.ranks[tree_ids][:, 1:].clamp_min(0)
    if distinct:
        drafts = (fav + rank) % vocab
    else:
        other = torch.randint(0, vocab, (batch, q - 1), device=device, generator=g)
        drafts = torch.where((rank == 0) & (rand(batch, q - 1) < 0.8), fav, other)
        first = torch.zeros_like(drafts)  # each node's rank-0 sibling's token (node ids: BFS, siblings adjacent)
        first[:, 1:] = drafts[:, :-1]
        drafts = torch.where((rank == 1) & (rand(batch, q - 1) < 0.3), first, drafts)
    rows = torch.arange(batch * q, device=device).view(batch, q)
    valid = torch.arange(q, device=device)[None, :] <= num_nodes[:, None]
    row_of_node = torch.where(valid, rows, -1)
    idx = torch.arange(batch, device=device)
    temperature = torch.where(idx % 4 == 0, 0.0, 0.3 + 1.2 * rand(batch))
    top_k = top_p = min_p = None
    if filters:
        top_k = torch.tensor([vocab, 1, 20, vocab, 200, 7], dtype=torch.int32, device=device)[idx % 6]
        top_p = torch.tensor([1.0, 0.9, 0.5, 0.95, 0.99, 0.3, 1.0], device=device)[idx % 7]
        min_p = torch.tensor([0.0, 0.0, 0.05, 0.0, 0.2], device=device)[idx % 5]
    return (logits.to(logits_dtype), row_of_node, stack.children[tree_ids].contiguous(), drafts, valid,
            temperature.float(), top_k, top_p, min_p, rand(batch, levels, width), rand(batch))
