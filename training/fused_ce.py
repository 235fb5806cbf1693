"""Chunked fused linear + cross-entropy: the [tokens x vocab] logits never exist in full.

`fused_linear_cross_entropy(hidden, weight, target)` equals
`F.cross_entropy(hidden @ weight.T, target, ignore_index=-100)` (mean over valid tokens) in value
and gradients (for `hidden` and `weight`), but walks over the valid rows in chunks: each chunk's
logits [chunk, V] are built, reduced to the loss, turned into the gradient
`d logits = softmax - onehot` and multiplied back into grad_hidden [chunk, H] and grad_weight
[V, H] right away (Liger-Kernel's scheme: gradients are computed in the forward pass and only
scaled in the backward pass). Peak extra memory: a few [chunk, V] buffers, grad_hidden, and for
the weight a float32 accumulator plus one [V, H] product per chunk (rounded to the weight's dtype
once, at the end).

Several cross-entropies over the same weight (the K Medusa heads, plus the base LM head in
Medusa-2) go in one call: `hidden [N, G, H]`, `target [N, G]`, and `group_weights [G]`; the loss is
`sum_g w_g * mean CE of group g` (a group with no valid token contributes 0), and one grad_weight
accumulator serves all groups. The call also returns, without extra memory, each group's mean
loss and how many valid tokens have their target within the top-1..top-k logits.

Backends: "chunked" (this file, CPU and CUDA) and "liger" (`liger_kernel` on CUDA when installed;
the per-group statistics then come from one extra no-grad chunked pass).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

BACKENDS = ("chunked", "liger", "auto")


@dataclass
class FusedCEOutput:
    loss: Tensor  # [] float32, differentiable: sum_g w_g * group_loss[g]
    group_loss: Tensor  # [G] float32, detached: mean CE per group (0 where num_valid is 0)
    correct: Tensor  # [G, topk] int64: valid tokens whose target ranks < j+1 (top-(j+1) hits)
    num_valid: Tensor  # [G] int64: tokens whose target != ignore_index


def default_chunk_size(vocab_size: int) -> int:
    """Rows per chunk so that one chunk of fp32 logits is ~512 MiB (at least 64 rows)."""
    return max(64, (1 << 27) // vocab_size // 64 * 64)


def fused_linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, *,
                               group_weights: Sequence[float] | None = None,
                               ignore_index: int = -100, chunk_size: int | None = None,
                               topk: int = 1, backend: str = "chunked") -> FusedCEOutput:
    """hidden [N, H] or [N, G, H]; weight [V, H] (same dtype and device); target [N] or [N, G]
    (int64, ignore_index where no loss); group_weights [G] (default all 1)."""
    grouped = hidden.dim() == 3
    if hidden.dim() not in (2, 3) or target.shape != hidden.shape[:-1]:
        raise ValueError(f"fused_linear_cross_entropy: expected hidden [N, H] or [N, G, H] and target "
                         f"[N] or [N, G]; got hidden {list(hidden.shape)}, target {list(target.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"fused_linear_cross_entropy: weight must be [V, H={hidden.shape[-1]}], "
                         f"got {list(weight.shape)}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(f"fused_linear_cross_entropy: hidden ({hidden.dtype}, {hidden.device}) and "
                         f"weight ({weight.dtype}, {weight.device}) must share dtype and device")
    if target.dtype not in (torch.int64, torch.int32) or target.device != hidden.device:
        raise ValueError("fused_linear_cross_entropy: target must be an int64/int32 tensor on "
                         f"{hidden.device}, got {target.dtype} on {target.device}")
    num_groups = hidden.shape[1] if grouped else 1
    weights = [1.0] * num_groups if group_weights is None else [float(w) for w in group_weights]
    if len(weights) != num_groups:
        raise ValueError(f"fused_linear_cross_entropy: {len(weights)} group_weights for {num_groups} groups")
    if topk < 0:
        raise ValueError(f"fused_linear_cross_entropy: topk must be >= 0, got {topk}")
    chunk = chunk_size or default_chunk_size(weight.shape[0])
    if chunk <= 0:
        raise ValueError(f"fused_linear_cross_entropy: chunk_size must be positive, got {chunk}")
    if backend not in BACKENDS:
        raise ValueError(f"fused_linear_cross_entropy: backend {backend!r} is not one of {BACKENDS}")
    if not torch.is_grad_enabled():  # no_grad: the Function would still see requires_grad
        hidden, weight = hidden.detach(), weight.detach()
    rows = hidden.reshape(-1, hidden.shape[-1])  # [N*G, H]; row r belongs to group r % G
    flat_target = target.reshape(-1).long()  # [N*G]
    if backend == "auto":
        backend = "liger" if hidden.is_cuda and liger_available() else "chunked"
    if backend == "liger":
        return _liger(rows, weight, flat_target, weights, ignore_index, chunk, topk)
    with torch.autocast(device_type=hidden.device.type, enabled=False):  # dtypes as given
        loss, group_loss, correct, num_valid = _ChunkedLinearCE.apply(
            rows, weight, flat_target, tuple(weights), ignore_index, chunk, topk)
    return FusedCEOutput(loss, group_loss, correct, num_valid)


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: Tensor, weight: Tensor, target: Tensor, weights: tuple[float, ...],
                ignore_index: int, chunk: int, topk: int):
        # rows [R, H], weight [V, H], target [R] (int64); row r is in group r % G
        G, (R, H), V = len(weights), rows.shape, weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[:2]
        dev = rows.device
        valid = (target != ignore_index).nonzero().squeeze(1)  # [M] row ids with a loss
        tgt = target[valid]  # [M]
        if tgt.numel() and (int(tgt.min()) < 0 or int(tgt.max()) >= V):
            raise ValueError(f"fused_linear_cross_entropy: targets must lie in [0, {V}) or equal "
                             f"ignore_index={ignore_index}; got {int(tgt.min())}..{int(tgt.max())}")
        gid = valid % G  # [M] group of each valid row
        num_valid = torch.bincount(gid, minlength=G)  # [G]
        w = torch.tensor(weights, dtype=torch.float32, device=dev)  # [G]
        row_scale = (w / num_valid.clamp(min=1))[gid]  # [M] d loss / d (row CE)
        loss_sum = torch.zeros(G, dtype=torch.float32, device=dev)
        hist = torch.zeros(G * (topk + 1), dtype=torch.int64, device=dev)  # rank histogram
        grad_rows = torch.zeros_like(rows) if need_h else None  # [R, H]
        grad_w = torch.zeros(V, H, dtype=torch.float32, device=dev) if need_w else None  # [V, H]
        for start in range(0, valid.numel(), chunk):
            idx = valid[start:start + chunk]  # [c]
            t, g = tgt[start:start + chunk], gid[start:start + chunk]  # [c], [c]
            h = rows[idx]  # [c, H]
            logits = (h @ weight.T).float()  # [c, V]
            t_logit = logits.gather(1, t[:, None])  # [c, 1]
            lse = torch.logsumexp(logits, dim=1, keepdim=True)  # [c, 1]
            loss_sum.index_add_(0, g, (lse - t_logit).squeeze(1))
            if topk:
                rank = (logits > t_logit).sum(1).clamp_(max=topk)  # [c] rank of the target
                hist += torch.bincount(g * (topk + 1) + rank, minlength=G * (topk + 1))
            if need_h or need_w:
                d = logits.sub_(lse).exp_()  # softmax, in place: [c, V]
                d.scatter_add_(1, t[:, None], torch.full_like(t_logit, -1.0))
                d = d.mul_(row_scale[start:start + chunk, None]).to(rows.dtype)  # d loss / d logits
                if need_h:
                    grad_rows.index_copy_(0, idx, d @ weight)
                if need_w:
                    grad_w += d.T @ h
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)  # fp32 sums over chunks, rounded once
        ctx.save_for_backward(grad_rows, grad_w)
        group_loss = loss_sum / num_valid.clamp(min=1)
        correct = hist.view(G, topk + 1)[:, :topk].cumsum(1)
        ctx.mark_non_differentiable(group_loss, correct, num_valid)
        return (w * group_loss).sum(), group_loss, correct, num_valid

    @staticmethod
    def backward(ctx, grad_loss: Tensor, *_unused):
        grad_rows, grad_w = ctx.saved_tensors
        if grad_rows is not None:
            grad_rows = grad_rows * grad_loss.to(grad_rows.dtype)
        if grad_w is not None:
            grad_w = grad_w * grad_loss.to(grad_w.dtype)
        return grad_rows, grad_w, None, None, None, None, None


def liger_available() -> bool:
    try:
        import liger_kernel.transformers.fused_linear_cross_entropy  # noqa: F401
    except ImportError:
        return False
    return True


def _liger(rows: Tensor, weight: Tensor, target: Tensor, weights: list[float], ignore_index: int,
           chunk: int, topk: int) -> FusedCEOutput:
    """One Liger call per group (each with its own mean); statistics from a no-grad chunked pass."""
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    if not rows.is_cuda:
        raise ValueError("fused_linear_cross_entropy: the liger backend needs CUDA tensors")
    ce = LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index, reduction="mean")
    G = len(weights)
    with torch.no_grad():
        _, group_loss, correct, num_valid = _ChunkedLinearCE.apply(
            rows.detach(), weight.detach(), target, tuple(weights), ignore_index, chunk, topk)
    loss = rows.new_zeros((), dtype=torch.float32)
    for g, n in enumerate(num_valid.tolist()):
        if n and weights[g]:
            out = ce(weight, rows[g::G].contiguous(), target[g::G].contiguous())
            loss = loss + weights[g] * (out[0] if isinstance(out, tuple) else out).float()
    return FusedCEOutput(loss, group_loss, correct, num_valid)
