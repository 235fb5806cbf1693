"""A small CUDA case for compute-sanitizer (run by gpu_check.sh): both tile configs, split-KV,
both head dims, a 2-word mask, q_len 0/1 requests, unused block-table entries = -1 (an
out-of-range block read would hit memory outside the cache), a CUDA graph of split-KV calls
replayed with new seq_lens, then move_accepted_kv. Exits non-zero on a mismatch with the reference.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python benchmarks/kernels/memcheck_case.py
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from medusa_vllm import kernels  # noqa: E402
from medusa_vllm.kernels import testing as kt  # noqa: E402


def attention_cases():
    gen = torch.Generator().manual_seed(0)
    masks = [kt.medusa_mask(63), kt.random_tree_mask(100, gen)]
    for head_dim in (64, 128):
        for heads in ((14, 2), (4, 4)):  # Large and Small tile configs
            for splits in (1, 3):
                yield dict(q_lens=[64, 0, 1, 100], ctx_lens=[300, 5, 17, 1000], tree_ids=[0, 0, 0, 1], masks=masks,
                           num_q_heads=heads[0], num_kv_heads=heads[1], head_dim=head_dim, block_size=16,
                           dtype=torch.bfloat16, device="cuda", seed=head_dim), splits


def graph_replays_ok() -> bool:
    """Batch 1 (the launch splits the keys), two calls captured in one CUDA graph, replayed three
    times with shorter contexts: each replay must match the reference."""
    p = kt.make_tree_attention_problem(
        q_lens=[64], ctx_lens=[400], tree_ids=[0], masks=[kt.medusa_mask(63)], num_q_heads=9, num_kv_heads=3,
        head_dim=64, block_size=16, dtype=torch.bfloat16, device="cuda", seed=1)
    outs = [p.out, torch.empty_like(p.out)]
    side = torch.cuda.Stream()  # the launch's one-time queries, outside the capture
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        kernels.tree_attention(outs[0], *p.args()[1:], p.scale, 0.0, 0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for out in outs:
            kernels.tree_attention(out, *p.args()[1:], p.scale, 0.0, 0)
    ok = True
    for shorten in (0, 100, 150):
        p.seq_lens.sub_(shorten)
        for out in outs:
            out.fill_(float("nan"))
        graph.replay()
        expected = p.out.clone()
        kernels.tree_attention_ref(expected, *p.args()[1:], p.scale)
        err = torch.stack([(out.float() - expected.float()).abs().max() for out in outs]).max().item()  # NaN stays
        ok &= err < 3e-2
        print(f"graph replay, seq_len {int(p.seq_lens[0])}: max err {err:.3g} {'ok' if err < 3e-2 else 'FAIL'}")
    return ok


def main() -> int:
    assert kernels.have_extension(), kernels.extension_error()
    failures = 0
    for kwargs, splits in attention_cases():
        p = kt.make_tree_attention_problem(**kwargs)
        expected = p.out.clone()
        kernels.tree_attention_ref(expected, *p.args()[1:], p.scale)
        kernels.tree_attention(p.out, *p.args()[1:], p.scale, 0.0, splits)
        err = (p.out.float() - expected.float()).abs().max().item()
        ok = err < 3e-2
        failures += not ok
        print(f"tree_attention D={kwargs['head_dim']} heads={kwargs['num_q_heads']}/{kwargs['num_kv_heads']} "
              f"splits={splits}: max err {err:.3g} {'ok' if ok else 'FAIL'}")
    failures += not graph_replays_ok()
    kwargs = next(attention_cases())[0]
    p = kt.make_tree_attention_problem(**kwargs)
    layers = [p.cache] + [kt.make_kv_cache(*p.cache.k.shape, torch.bfloat16, "cuda", "nhd") for _ in range(2)]
    accepted = torch.tensor([[2, 5, 9, -1], [-1] * 4, [-1] * 4, [1, 7, 99, -1]], dtype=torch.int32, device="cuda")
    before = [c.storage.clone() for c in layers]
    kernels.move_accepted_kv([c.k for c in layers], [c.v for c in layers], p.slot_mapping, p.query_start_loc, accepted)
    got = [c.storage.clone() for c in layers]
    for c, b in zip(layers, before):
        c.storage.copy_(b)
    kernels.move_accepted_kv_ref([c.k for c in layers], [c.v for c in layers], p.slot_mapping, p.query_start_loc,
                                 accepted)
    ok = all(torch.equal(g, c.storage) for g, c in zip(got, layers))
    failures += not ok
    print(f"move_accepted_kv, 3 layers: {'ok' if ok else 'FAIL'}")
    torch.cuda.synchronize()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
