"""Peak memory of the chunked fused linear + cross-entropy vs materialized logits (same batch).

The Medusa loss at a 128k-vocab model shape (Liger-Kernel's Medusa example: hidden 4096, vocab
128256, 4 heads, 4 x 2048 tokens, bf16): K heads' hidden states [N, K, H] against one vocab
projection [V, H], per-head weights 0.8**k, forward + backward. "naive" builds the logits
[N, K, V] and calls F.cross_entropy; "fused" is training.fused_ce. Peak = the largest memory
allocated during the loss's forward + backward minus what was allocated before it (the inputs,
resident in both); measured with and without a gradient for the projection (Medusa-2 / own lm
heads train it; Medusa-1 with the shared lm_head does not).

    python benchmarks/fused_ce_memory.py                # CUDA: the 128k shape; CPU: a small one
    python benchmarks/fused_ce_memory.py --tokens 2048 --vocab 32000 --hidden 2048

CUDA peaks come from torch.cuda.max_memory_allocated; on CPU each variant runs in a fresh
process and the peak is the growth of its maximum resident set size (a smoke test, coarser).
Writes benchmarks/results/fused_ce_memory_<device>.json (the shared envelope, benchmarks/common.py)
and prints the ratio fused / naive.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, device_name, device_tag, write_envelope  # noqa: E402
from training.fused_ce import fused_linear_cross_entropy  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def make_inputs(args, device: torch.device, weight_grad: bool):
    gen = torch.Generator(device=device).manual_seed(args.seed)
    dtype, kw = DTYPES[args.dtype], {"generator": gen, "device": device}
    hidden = (torch.randn(args.tokens, args.heads, args.hidden, **kw) * 0.5).to(dtype)
    weight = (torch.randn(args.vocab, args.hidden, **kw) * args.hidden ** -0.5).to(dtype)
    target = torch.randint(0, args.vocab, (args.tokens, args.heads), **kw)
    target[-(args.tokens // 10):, 1:] = -100  # tail positions: later heads have no target
    return hidden.requires_grad_(), weight.requires_grad_(weight_grad), target


def naive_loss(hidden, weight, target, weights):
    logits = hidden @ weight.T  # [N, K, V]: materialized
    rows = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="none")
    rows = rows.view(target.shape).float()  # [N, K]
    valid = (target != -100).float()
    per_head = (rows * valid).sum(0) / valid.sum(0).clamp(min=1)
    return (per_head * torch.tensor(weights, device=hidden.device)).sum()


def fused_loss(hidden, weight, target, weights, chunk_size=None):
    return fused_linear_cross_entropy(hidden, weight, target, group_weights=weights,
                                      chunk_size=chunk_size).loss


def run_variant(args, variant: str, weight_grad: bool, device: torch.device) -> dict:
    """Forward + backward once (after a warm-up); -> peak extra bytes, time, loss, grad norms."""
    hidden, weight, target = make_inputs(args, device, weight_grad)
    weights = [0.8 ** k for k in range(args.heads)]
    fn = naive_loss if variant == "naive" else lambda *a: fused_loss(*a, chunk_size=args.chunk_size)

    def once():
        hidden.grad = weight.grad = None
        loss = fn(hidden, weight, target, weights)
        loss.backward()
        return loss

    if device.type == "cuda":
        once()  # warm-up (cuBLAS workspaces, kernels)
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        loss = once()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak, peak_total = torch.cuda.max_memory_allocated() - before, torch.cuda.max_memory_allocated()
    else:
        before = _maxrss_bytes()
        t0 = time.perf_counter()
        loss = once()
        seconds = time.perf_counter() - t0
        peak, peak_total = _maxrss_bytes() - before, _maxrss_bytes()
    grad_w = weight.grad.float().norm().item() if weight_grad else None
    return {"variant": variant, "weight_grad": weight_grad, "peak_extra_bytes": int(peak),
            "peak_total_bytes": int(peak_total), "seconds": round(seconds, 4), "loss": loss.item(),
            "grad_hidden_norm": hidden.grad.float().norm().item(), "grad_weight_norm": grad_w}


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _child(conn, args, variant, weight_grad):
    torch.manual_seed(args.seed)
    conn.send(run_variant(args, variant, weight_grad, torch.device("cpu")))
    conn.close()


def measure(args, variant: str, weight_grad: bool, device: torch.device) -> dict:
    if device.type == "cuda":
        row = run_variant(args, variant, weight_grad, device)
        torch.cuda.empty_cache()
        return row
    ctx = mp.get_context("spawn")  # a fresh process: its peak RSS belongs to this variant alone
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, args, variant, weight_grad))
    proc.start()
    row = parent.recv()
    proc.join()
    return row


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and not args.full_shape_on_cpu:
        args.tokens, args.hidden, args.vocab = min(args.tokens, 1024), min(args.hidden, 256), min(args.vocab, 16384)
        args.chunk_size = args.chunk_size or 256  # the default (by vocab) would be one chunk here
    rows = []
    for weight_grad in (True, False):
        pair = {v: measure(args, v, weight_grad, device) for v in ("naive", "fused")}
        n, f = pair["naive"], pair["fused"]
        for r in (n, f):
            r["ratio_fused_vs_naive"] = f["peak_extra_bytes"] / max(n["peak_extra_bytes"], 1)
            r["loss_rel_diff"] = abs(f["loss"] - n["loss"]) / abs(n["loss"])
            rows.append(r)
        print(f"weight grad {str(weight_grad):5}: naive {n['peak_extra_bytes'] / 2**30:7.3f} GiB "
              f"{n['seconds'] * 1e3:8.1f} ms | fused {f['peak_extra_bytes'] / 2**30:7.3f} GiB "
              f"{f['seconds'] * 1e3:8.1f} ms | ratio {f['peak_extra_bytes'] / max(n['peak_extra_bytes'], 1):.3f} "
              f"| loss {n['loss']:.5f} vs {f['loss']:.5f}")
    by = {(r["variant"], r["weight_grad"]): r for r in rows}
    summary = {"peak_mem_fused_vs_naive": round(by["fused", True]["ratio_fused_vs_naive"], 4),
               "peak_mem_fused_vs_naive_frozen_weight": round(by["fused", False]["ratio_fused_vs_naive"], 4),
               "peak_total_fused_vs_naive": round(by["fused", True]["peak_total_bytes"]
                                                  / by["naive", True]["peak_total_bytes"], 4),
               "naive_peak_gib": round(by["naive", True]["peak_extra_bytes"] / 2**30, 3),
               "fused_peak_gib": round(by["fused", True]["peak_extra_bytes"] / 2**30, 3),
               "device": device_name()}
    note = "(target <= 0.35)" if device.type == "cuda" else "(CPU: peak-RSS growth, a coarse smoke test)"
    print(f"peak_mem_fused_vs_naive = {summary['peak_mem_fused_vs_naive']} {note}")
    config = {k: v for k, v in vars(args).items() if k != "out"}
    out = Path(args.out) if args.out else RESULTS / f"fused_ce_memory_{device_tag()}.json"
    write_envelope(out, "fused_ce_memory", config, rows, summary)
    print(f"wrote {out}")
    return summary


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4 * 2048, help="N: batch x sequence")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--chunk-size", type=int, default=None, help="fused rows per chunk (default: by vocab)")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--full-shape-on-cpu", action="store_true", help="do not shrink the shape on CPU")
    p.add_argument("--out", help="JSON path (default: benchmarks/results/fused_ce_memory_<device>.json)")
    return p.parse_args(argv)


if __name__ == "__main__":
    main()
