"""Plain PyTorch references of the medusa_vllm ops: the test oracle and the fallback when the
compiled extension is missing. Slow (Python loops over requests, host syncs), obviously right;
except :func:`keyed_uniforms_ref`, tensor ops without a sync (two dozen kernels where the op
launches one).

Conventions shared with the kernels (see csrc/paged_kv.h):
- k_cache / v_cache: strided views [num_blocks, block_size, num_kv_heads, head_dim].
- Request b owns query tokens [qsl[b], qsl[b+1]) and seq_lens[b] keys; with
  ctx = seq_len - q_len, query i sees keys [0, ctx) and window key ctx + j iff bit j of
  tree_masks[req_tree_ids[b], i] is set. A row that sees no key at all gets zeros.
- Query head h uses kv head h // (Hq // Hkv).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from medusa_vllm.kernels.masks import unpack_tree_masks


def gather_paged(cache: torch.Tensor, block_table_row: torch.Tensor, length: int) -> torch.Tensor:
    """Positions [0, length) of one request: cache [nb, bs, H, D] -> [length, H, D]."""
    block_size = cache.shape[1]
    pos = torch.arange(length, device=cache.device)
    blocks = block_table_row.to(cache.device).long()[pos // block_size]
    return cache[blocks, pos % block_size]


def request_mask(tree_masks: torch.Tensor, tree_id: int, q_len: int, seq_len: int) -> torch.Tensor:
    """[q_len, seq_len] bool: context fully visible, window keys by the tree bits."""
    ctx = seq_len - q_len
    mask = torch.ones(q_len, seq_len, dtype=torch.bool, device=tree_masks.device)
    window = unpack_tree_masks(tree_masks[tree_id : tree_id + 1, :q_len])[0, :, :q_len]
    mask[:, ctx:] = window
    return mask


def tree_attention_ref(
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
    del num_splits  # a kernel tuning knob; no effect on the result
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    tree_ids = req_tree_ids.tolist()
    group = q.shape[1] // k_cache.shape[2]
    for b, seq_len in enumerate(lens):
        start, end = qsl[b], qsl[b + 1]
        q_len = end - start
        if q_len == 0:
            continue
        if q_len > tree_masks.shape[1] or seq_len < q_len:
            raise ValueError(f"request {b}: q_len {q_len}, seq_len {seq_len}, Q_MAX {tree_masks.shape[1]}")
        k = gather_paged(k_cache, block_table[b], seq_len).float().repeat_interleave(group, dim=1)  # [L, Hq, D]
        v = gather_paged(v_cache, block_table[b], seq_len).float().repeat_interleave(group, dim=1)  # [L, Hq, D]
        mask = request_mask(tree_masks, tree_ids[b], q_len, seq_len).to(q.device)  # [q_len, L]
        logits = torch.einsum("qhd,khd->hqk", q[start:end].float(), k) * scale  # [Hq, q_len, L]
        if softcap > 0:
            logits = softcap * torch.tanh(logits / softcap)
        logits = logits.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # all-masked rows -> 0
        out[start:end] = torch.einsum("hqk,khd->qhd", probs, v).to(out.dtype)


def move_accepted_kv_ref(
    k_caches: Sequence[torch.Tensor],  # L x [num_blocks, block_size, Hkv, D] (mutated)
    v_caches: Sequence[torch.Tensor],  # L x [num_blocks, block_size, Hkv, D] (mutated)
    slot_mapping: torch.Tensor,  # [N] int64
    query_start_loc: torch.Tensor,  # [B + 1] int32
    accepted: torch.Tensor,  # [B, A] int32, -1 terminated
) -> None:
    """For each request, step k (ascending) copies window index accepted[b, k] to k + 1."""
    qsl = query_start_loc.tolist()
    slots = slot_mapping.tolist()
    block_size = k_caches[0].shape[1]
    for b, row in enumerate(accepted.tolist()):
        start, q_len = qsl[b], qsl[b + 1] - qsl[b]
        for k, idx in enumerate(row):
            if idx < 0 or idx >= q_len or k + 1 >= q_len:
                break  # end of the list (or an index outside the window)
            if idx == k + 1:
                continue  # already in place
            src, dst = slots[start + idx], slots[start + k + 1]
            if src < 0 or dst < 0:
                continue  # padding slot
            for cache in (*k_caches, *v_caches):
                cache[dst // block_size, dst % block_size] = cache[src // block_size, src % block_size]


_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 ``x`` in [0, 2**32) and a constant ``c`` < 2**32, in 16-bit
    halves of ``c`` so that no int64 product overflows."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer (a bijection of [0, 2**32) with full avalanche)."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def keyed_uniforms_ref(keys: torch.Tensor, n: int) -> torch.Tensor:
    """The reference of :func:`medusa_vllm.kernels.keyed_uniforms` (csrc/keyed_uniforms.h) in
    int64 tensor ops: [B, 2] int64 (seed, counter) -> [B, n] float32, the same bits."""
    seed, counter = keys[:, 0], keys[:, 1]
    x = _fmix32((counter & _M32) ^ 0x5BD1E995)
    x = _fmix32(x ^ ((seed >> 32) & _M32))
    x = _fmix32(x ^ (seed & _M32))  # [B]
    j = torch.arange(n, device=keys.device, dtype=torch.int64) * _GOLDEN  # [n], < 2**63
    h = _fmix32((x[:, None] + j[None, :]) & _M32)
    return (h >> 8).float() * (1.0 / (1 << 24))


def target_probs_ref(
    logits: torch.Tensor,  # [M, V] float32 / bfloat16 / float16
    temperature: torch.Tensor,  # [M] float32, > 0
    top_k: torch.Tensor | None = None,  # [M] int32, <= 0 or >= V: off
    top_p: torch.Tensor | None = None,  # [M] float32, >= 1: off
    min_p: torch.Tensor | None = None,  # [M] float32, <= 0: off
) -> torch.Tensor:  # [M, V] float32
    """The filtered target distribution (csrc/target_probs.h), with a stable sort: logits / T;
    min-p keeps e >= min_p (e = exp(x - max x)); in order of x descending, ties by token id
    (vLLM's Triton top-k/top-p kernel's rule): top-k keeps the first k, top-p the shortest
    prefix of those whose mass reaches p of theirs; then the kept e normalised. A row of -inf
    gives NaN."""
    x = logits.float() / temperature.float().unsqueeze(1)
    vocab = x.shape[1]
    e = torch.exp(x - x.amax(dim=-1, keepdim=True))
    keep = torch.ones_like(x, dtype=torch.bool)
    if min_p is not None:
        keep &= ~((min_p > 0).unsqueeze(1) & (e < min_p.unsqueeze(1)))
    # -0 and +0 tie (the ops' keys treat them as one value)
    order = torch.sort(x + 0.0, dim=-1, descending=True, stable=True).indices  # [M, V]
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(vocab, device=x.device).expand_as(order))
    if top_k is not None:
        k = top_k.long()
        keep &= ~((k > 0) & (k < vocab)).unsqueeze(1) | (rank < k.unsqueeze(1))
    if top_p is not None:
        mass = torch.where(keep, e, 0.0).double().gather(1, order)  # in float64: the op sums exactly
        before = mass.cumsum(dim=-1) - mass  # the kept mass ahead of each position
        target = top_p.double().unsqueeze(1) * mass.sum(dim=-1, keepdim=True)
        reach = (before < target) | (before == 0)  # (p = 0 keeps the top token)
        keep &= (top_p >= 1).unsqueeze(1) | reach.gather(1, rank)
    e = torch.where(keep, e, 0.0)
    return e / e.sum(dim=-1, keepdim=True)


GREEDY_TEMPERATURE = 1e-5  # medusa_vllm.sampling._EPS_TEMPERATURE


def rejection_walk_ref(
    logits: torch.Tensor,  # [R, V] float32 / bfloat16 / float16
    row_of_node: torch.Tensor,  # [B, Q] int64, -1: none (read as row 0)
    children: torch.Tensor,  # [B, Q, C] int64, -1: none
    drafts: torch.Tensor,  # [B, Q-1] int64 token of node i at i - 1
    valid: torch.Tensor,  # [B, Q] bool: node verified
    temperature: torch.Tensor,  # [B] float32, <= 1e-5: greedy
    top_k: torch.Tensor | None,  # [B] int32, <= 0 or >= V: off
    top_p: torch.Tensor | None,  # [B] float32, >= 1: off
    min_p: torch.Tensor | None,  # [B] float32, <= 0: off
    accept_u: torch.Tensor,  # [B, L, C] float32 uniforms of each level's children
    final_u: torch.Tensor,  # [B] float32 uniform of the final draw
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # accepted [B, L-1], last_node [B], final [B]
    """The rejection walk of csrc/rejection_walk.h in tensor ops, level by level over the batch:
    the target at each current node's row (softmax of x / T over the tokens
    :func:`target_probs_ref` keeps, or the point mass at the argmax),
    the first offered child accepted with probability p / (1 - the earlier offered p), and at
    the stopping node the final token by the inverse CDF of fixed-point masses (floor(e * 2^s),
    e = exp(x / T - max), the stopping node's offered tokens left out unless they held it all)."""
    b, q = row_of_node.shape
    width, levels, vocab = children.shape[2], accept_u.shape[1], logits.shape[1]
    dev = logits.device
    scale = 2.0 ** (62 - max(vocab - 1, 0).bit_length())  # target_probs.h: mass_scale_log2
    greedy = temperature <= GREEDY_TEMPERATURE
    temp = torch.where(greedy, torch.ones_like(temperature), temperature).float()
    tokens = torch.cat([torch.zeros_like(drafts[:, :1]), drafts], dim=1).clamp_min(0)  # [B, Q] token per node
    batch = torch.arange(b, device=dev)
    earlier = torch.ones(width, width, dtype=torch.bool, device=dev).tril_(-1)
    cur = torch.zeros(b, dtype=torch.int64, device=dev)
    active = torch.ones(b, dtype=torch.bool, device=dev)
    accepted = torch.full((b, max(levels - 1, 0)), -1, dtype=torch.int64, device=dev)
    final = torch.zeros(b, dtype=torch.int64, device=dev)
    for level in range(levels):
        rows = row_of_node[batch, cur].clamp(0, logits.shape[0] - 1)
        raw = logits[rows].float()  # [B, V]
        x = raw / temp[:, None]
        e = torch.exp(x - x.amax(dim=1, keepdim=True))
        if top_k is not None or top_p is not None or min_p is not None:
            e = torch.where(target_probs_ref(raw, temp, top_k, top_p, min_p) > 0, e, 0.0)
        argmax = raw.argmax(dim=1)
        point = torch.zeros_like(e).scatter_(1, argmax[:, None], 1.0)
        e = torch.where(greedy[:, None], point, e)  # (a greedy row's e is its point mass, z = 1)
        empty = ~greedy & ~(e.sum(dim=1) > 0)
        kid = children[batch, cur]  # [B, C]
        kid_tok = tokens.gather(1, kid.clamp_min(0))
        ok = (kid >= 0) & valid.gather(1, kid.clamp_min(0))
        dup = ((kid_tok[:, :, None] == kid_tok[:, None, :]) & earlier & ok[:, None, :]).any(dim=2)
        offered = ok & ~dup
        p = torch.where(offered & ~empty[:, None], e.gather(1, kid_tok) / e.sum(dim=1, keepdim=True), 0.0)
        remaining = 1.0 - (p.cumsum(dim=1) - p)
        accept = torch.where(remaining > 0, p / remaining.clamp_min(1e-30), 0.0)
        hit = (accept_u[:, level] < accept) & (p > 0) & active[:, None]
        if level == levels - 1:
            hit &= False  # (the last level's nodes are leaves: the walk stops there)
        step = hit.any(dim=1)
        child = kid.gather(1, hit.long().argmax(dim=1, keepdim=True))[:, 0]
        if level < levels - 1:
            accepted[:, level] = torch.where(step, child, -1)
        stop = active & ~step
        # the final draw at the rows that stop here
        mass = (e * scale).long()  # [B, V] (e * scale in float32, truncated: fixed_mass)
        removed = torch.zeros_like(mass).scatter_reduce(1, kid_tok, offered.long(), "amax") > 0
        rest = torch.where(removed, 0, mass)
        use_rest = rest.sum(dim=1) > 0
        cum = torch.where(use_rest[:, None], rest, mass).cumsum(dim=1)
        total = cum[:, -1]
        x_thr = torch.minimum((final_u.double() * total.double()).long(), (total - 1).clamp_min(0))
        tok = torch.searchsorted(cum, x_thr[:, None], right=True)[:, 0].clamp_max(vocab - 1)
        tok = torch.where(total > 0, tok, torch.where(greedy, argmax, 0))
        tok = torch.where(empty, 0, tok)
        final = torch.where(stop, tok, final)
        cur = torch.where(step, child, cur)
        active = step
    return accepted, cur, final
