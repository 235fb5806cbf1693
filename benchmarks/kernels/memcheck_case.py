"""A small CUDA case for compute-sanitizer (run by gpu_check.sh): both tile configs, split-KV,
both head dims, a 2-word mask, q_len 0/1 requests, unused block-table entries = -1 (an
out-of-range block read would hit memory outside the cache), then move_accepted_kv.
Exits non-zero on a mismatch with the reference.

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
